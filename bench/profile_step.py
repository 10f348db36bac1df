"""Where a captured speculative step's time goes, kernel by kernel (GPU).

Builds the ``bench/e2e.py`` pair with random bf16 weights, captures the engine at one context, then replays each
phase's CUDA graph under ``torch.profiler`` and prints, per phase: the replay time (CUDA events), the summed time
of the kernels inside it (the rest is the gaps between kernels), the kernel count, and the kernels grouped by
kind (matrix products, attention, selection, other), with the top kernels by time.

    python3 bench/profile_step.py --pair llama2 --context 32768 --k 4 --out bench/profile_llama2_h200.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ itself is sys.path[0]: replace it (its kernels.py would shadow the `kernels` package
# that transformers imports where it is installed)
sys.path[0:1] = [str(ROOT)] if Path(sys.path[0]).resolve() == ROOT / "bench" else [str(ROOT), sys.path[0]]

from bench.e2e import PAIRS, ForcedAcceptance, artifact_for, build  # noqa: E402
from specattn_runtime import SpecAttnRuntime  # noqa: E402

KINDS = [("matmul", re.compile(r"gemm|gemv|sm90|cutlass|cublas|nvjet|splitk|mm_", re.I)),
         ("attention", re.compile(r"_attn|attention|combine|pool_record", re.I)),
         ("selection", re.compile(r"topp_select|_select_kernel", re.I))]


def kind_of(name: str) -> str:
    return next((k for k, rx in KINDS if rx.search(name)), "other")


def profile_graph(graph: torch.cuda.CUDAGraph, reps: int) -> dict:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_us = start.elapsed_time(end) * 1e3 / reps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time_total > 0:
            per_kernel[ev.name].append(ev.device_time_total)
    kernels = {n: (len(v) / reps, sum(v) / reps) for n, v in per_kernel.items()}  # (launches, us) per replay
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for n, (cnt, us) in kernels.items():
        by_kind[kind_of(n)][0] += cnt
        by_kind[kind_of(n)][1] += us
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:15]
    return {"replay_us": replay_us, "kernel_us": sum(us for _, us in kernels.values()),
            "kernels": sum(c for c, _ in kernels.values()), "by_kind": dict(by_kind),
            "top": [{"name": n[:110], "launches": c, "us": us} for n, (c, us) in top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), default="llama2")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="bench/profile_step.json")
    args = ap.parse_args()
    t_cfg, d_cfg = PAIRS[args.pair]
    torch.manual_seed(0)
    max_pos = args.context + 512
    target, draft = build(t_cfg, max_pos), build(d_cfg, max_pos)
    art = artifact_for(target.config.num_hidden_layers, draft.config.num_hidden_layers, args.density)
    rt = SpecAttnRuntime(art, draft, target)
    rt.engine_class = ForcedAcceptance
    ForcedAcceptance.accepted_length = 3.0
    ids = torch.randint(0, t_cfg["vocab_size"], (args.context,), device="cuda")
    result = {"meta": {**vars(args), "device": torch.cuda.get_device_name(), "torch": torch.__version__}}
    for k in (0, args.k):
        rt.generate(ids, 2 * (k + 1), k=k, eos_token_id=None)  # compile + capture + warm
        eng = rt._engines[(k, "greedy")]
        for name, graph in eng.graphs.items():
            r = profile_graph(graph, args.reps)
            result[f"k{k}_{name}"] = r
            print(f"\n== k={k} phase {name}: replay {r['replay_us']:.0f} us, kernels {r['kernel_us']:.0f} us "
                  f"({r['kernels']:.0f} launches; gaps {r['replay_us'] - r['kernel_us']:.0f} us)")
            for kind, (cnt, us) in sorted(r["by_kind"].items(), key=lambda kv: -kv[1][1]):
                print(f"   {kind:10s} {cnt:6.0f} launches {us:8.0f} us")
            for t in r["top"]:
                print(f"   {t['us']:8.1f} us {t['launches']:5.0f}x  {t['name']}")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
