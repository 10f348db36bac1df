"""Calibration's attention collection on 0 (this process), 1 and 2 local Dask workers, side by side (CPU).

On this 2-core machine the point is the overhead of the Dask route, not speed-up: cluster start, one model load
per worker and model, shard results passed as files. Prints a table, a model of the time for N workers built from
the measured per-shard cost, and writes JSON.

    python bench/calibrate_scale.py --workers 0 1 2 --out bench/calibrate_scale_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("PREFECT_TASKS_REFRESH_CACHE", "true")  # every configuration computes every shard
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ itself is sys.path[0]: replace it (its kernels.py would shadow the `kernels` package
# that transformers imports where it is installed)
sys.path[0:1] = [str(ROOT)] if Path(sys.path[0]).resolve() == ROOT / "bench" else [str(ROOT), sys.path[0]]

from pipelines import calibration_tasks as T  # noqa: E402
from pipelines.collect import collect_attention, task_runner  # noqa: E402
from pipelines.presets import PAIRS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--window-tokens", type=int, default=512)
    ap.add_argument("--num-windows", type=int, default=8)
    ap.add_argument("--holdout-windows", type=int, default=2)
    ap.add_argument("--windows-per-shard", type=int, default=2)
    ap.add_argument("--queries-per-window", type=int, default=32)
    ap.add_argument("--out", default="bench/calibrate_scale_cpu.json")
    args = ap.parse_args()
    draft, target = (str(p) for p in PAIRS["quick"].ensure())
    work = tempfile.mkdtemp(prefix="specattn-scale-")
    models = T.prepare_models.fn(draft, target)
    corpus = T.load_corpus.fn(None, target, models["tokenizer_hash"], args.window_tokens, args.num_windows,
                              args.holdout_windows, work)
    shards = 2 * sum(math.ceil(n / args.windows_per_shard) for n in (corpus["windows"], corpus["holdout_windows"]))
    rows = []
    for w in args.workers:
        flow = collect_attention.with_options(task_runner=task_runner(None, w))
        t0 = time.perf_counter()
        files = flow(models, corpus, args.queries_per_window, 16, work, args.windows_per_shard, progress=False)
        seconds = time.perf_counter() - t0
        shard_bytes = sum(p.stat().st_size for p in Path(work).glob("attn-*-*-*-*-*.safetensors"))  # not merged
        rows.append({"workers": w, "seconds": seconds, "shards": shards, "shard_bytes": shard_bytes,
                     "merged_bytes": sum(Path(f).stat().st_size for f in files.values())})
        print(f"workers {w}: {seconds:.1f} s for {shards} shards", flush=True)
    base = rows[0]["seconds"]
    print("\n| workers | seconds | x one process | shards | shard files MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers'] or 'none (this process)'} | {r['seconds']:.1f} | {base / r['seconds']:.2f} | "
              f"{r['shards']} | {r['shard_bytes'] / 1e6:.2f} |")
    # T(N) = c0 + S * t / N, fitted on the 1- and 2-worker runs: t the per-shard cost on a worker (Dask starts
    # workers with one torch thread each), c0 what does not shrink with N (cluster start, imports, model loads)
    by = {r["workers"]: r["seconds"] for r in rows}
    model_n, fit = {}, None
    if 1 in by and 2 in by:
        work_s = 2 * (by[1] - by[2])
        fit = {"fixed_s": by[1] - work_s, "per_shard_on_a_worker_s": work_s / shards}
        model_n = {n: fit["fixed_s"] + work_s / n for n in (1, 2, 4, 8, 16)}
        print(f"\nfit: fixed {fit['fixed_s']:.1f} s + {fit['per_shard_on_a_worker_s']:.2f} s per shard / N; "
              f"in this process {base / shards:.2f} s per shard (all cores). Model, N workers with a core each: "
              + ", ".join(f"{n}: {t:.1f} s" for n, t in model_n.items()))
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), **vars(args),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "fit": fit, "model_s": model_n}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
