"""Kernel benchmarks (GPU): top-p chunk selection, Triton vs torch sort-based top-p vs torch.topk.

Prints a table of medians and ratios measured side by side in one run, writes JSON. First checks the kernel
against the sort reference on fresh random inputs (a benchmark of a wrong kernel is worthless).

    python bench/kernels.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from specattn_runtime.selection import select_chunks  # noqa: E402
from specattn_runtime.selection.triton_select import indices_to_mask, topp_select_triton  # noqa: E402


def sort_topp(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The usual sort-based top-p (what the paper compares against): sort, cumsum, mask. float32 on device."""
    sorted_s, order = scores.sort(dim=-1, descending=True)
    cum = sorted_s.cumsum(-1)
    keep_sorted = (cum - sorted_s) < p[:, None] * cum[:, -1:]
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def bench(fn, rotate: list, warmup_ms=50, rep_ms=300) -> float:
    """Median microseconds of ``fn(*inputs)`` rotating over several input sets (no cache-resident replays)."""
    import triton

    i = [0]

    def call():
        fn(*rotate[i[0] % len(rotate)])
        i[0] += 1

    return triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def check(dev: str, gen: torch.Generator) -> None:
    for rows, c in ((256, 128), (64, 2048), (16, 8192)):
        scores = torch.softmax(torch.randn(rows, c, generator=gen) * 4, -1)
        p = torch.rand(rows, generator=gen) * 0.5 + 0.5
        n_valid = torch.randint(1, c + 1, (rows,), generator=gen)
        idx, cnt = topp_select_triton(scores.to(dev), p.to(dev), n_valid.to(dev))
        ref = select_chunks(scores.double().float(), p, n_valid, method="sort")
        got = indices_to_mask(idx.cpu(), cnt.cpu(), c)
        bad = int((got != ref).any(-1).sum())
        kept = (scores.double() * got).sum(-1) / scores.double().sum(-1)
        print(f"check rows={rows} chunks={c}: {bad} rows differ from the sort reference, "
              f"min kept mass - p = {float((kept - p.double()).min()):.2e}")
        # float32 sums on device vs float64 cumsum in the reference may split a boundary tie; more is a bug
        if bad > rows // 100:
            raise SystemExit("kernel disagrees with the reference: not benchmarking")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/kernels.json")
    ap.add_argument("--rows", type=int, default=32 * 8, help="layers x queries")
    args = ap.parse_args()
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    check(dev, gen)
    results = []
    for keys in (2048, 8192, 32768, 131072):
        c = keys // 16
        sets = []
        for _ in range(4):
            s = torch.softmax(torch.randn(args.rows, c, generator=gen) * 3, -1).to(dev)
            sets.append((s, torch.full((args.rows,), 0.97, device=dev),
                         torch.full((args.rows,), c, device=dev, dtype=torch.int32)))
        idx = torch.empty(args.rows, c, dtype=torch.int32, device=dev)
        cnt = torch.empty(args.rows, dtype=torch.int32, device=dev)
        k = max(1, c // 4)
        t_triton = bench(lambda s, p, n: topp_select_triton(s, p, n, out_idx=idx, out_count=cnt), sets)
        t_sort = bench(lambda s, p, n: sort_topp(s, p), sets)
        t_topk = bench(lambda s, p, n: torch.topk(s, k, dim=-1), sets)
        row = {"keys": keys, "chunks": c, "rows": args.rows, "triton_us": t_triton, "sort_topp_us": t_sort,
               "topk_us": t_topk, "sort_over_triton": t_sort / t_triton, "topk_over_triton": t_topk / t_triton}
        results.append(row)
    print(f"\nselection, rows={args.rows} (layers x queries), chunk 16, p=0.97, median us "
          f"({torch.cuda.get_device_name()}, torch {torch.__version__})")
    print(f"{'keys':>7} {'chunks':>6} {'triton':>9} {'sort top-p':>11} {'topk(c/4)':>10} {'sort/triton':>12} "
          f"{'topk/triton':>12}")
    for r in results:
        print(f"{r['keys']:>7} {r['chunks']:>6} {r['triton_us']:>9.1f} {r['sort_topp_us']:>11.1f} "
              f"{r['topk_us']:>10.1f} {r['sort_over_triton']:>12.2f} {r['topk_over_triton']:>12.2f}")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).write_text(json.dumps({"meta": meta, "selection": results}, indent=1))


if __name__ == "__main__":
    main()
