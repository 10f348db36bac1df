"""What recording costs in self-speculation's dense verification attention, and which launch settings hide it.

The self-speculative verification is a dense ``k + 1``-query attention that also records chunk-pooled attention
(``RECORD``); in ``bench/e2e.py`` its phase took ~19% more than an autoregressive step at 128K (llama2 shape).
This times one layer's attention at a given context (the llama2 MHA and llama3 GQA shapes, bf16), with and
without recording, over a grid of launch settings, and prints the best recording setting beside the default.

    python3 bench/self_record_sweep.py --context 131072 --out best.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ itself is sys.path[0]: replace it (its kernels.py would shadow the `kernels` package
# that transformers imports where it is installed)
sys.path[0:1] = [str(ROOT)] if Path(sys.path[0]).resolve() == ROOT / "bench" else [str(ROOT), sys.path[0]]

from specattn_runtime.sparse.triton_attn import sparse_attention_triton  # noqa: E402

SHAPES = {"llama2": (32, 32, 128), "llama3": (32, 8, 128)}  # query heads, KV heads, head_dim


def time_ms(q, k, v, lens, rec, **launch) -> float:
    def run():
        if rec is not None:
            rec.zero_()
        sparse_attention_triton(q, k, v, None, None, chunk_size=16, kv_lens=lens, record=rec, **launch)

    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--q-len", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the best recording launch per shape as JSON")
    args = ap.parse_args()
    torch.manual_seed(0)
    best = {}
    for name, (h, hkv, d) in SHAPES.items():
        cap = args.context + 64
        k = torch.randn(1, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.tensor([args.context], dtype=torch.int32, device="cuda")
        rec = torch.zeros(1, -(-cap // 16), dtype=torch.float32, device="cuda")
        q1 = torch.randn(1, h, 1, d, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(1, h, args.q_len, d, device="cuda", dtype=torch.bfloat16)
        kv_bytes = 2 * k.numel() * k.element_size() * args.context / cap
        base = time_ms(q1, k, v, lens, None)
        print(f"{name}: one-query dense {base:.3f} ms ({kv_bytes / base / 1e6:.0f} GB/s)", flush=True)
        rows = []
        for warps, stages, cpi in itertools.product((4, 8), (2, 3), (4, 8)):
            launch = dict(num_warps=warps, num_stages=stages, chunks_per_iter=cpi)
            try:
                plain, recd = time_ms(q, k, v, lens, None, **launch), time_ms(q, k, v, lens, rec, **launch)
            except Exception as e:  # out of shared memory / registers for this setting
                print(f"  {launch}: {type(e).__name__}", flush=True)
                continue
            rows.append((recd, plain, launch))
            print(f"  warps {warps} stages {stages} chunks/iter {cpi}: no record {plain:.3f} ms, record {recd:.3f} ms "
                  f"({kv_bytes / recd / 1e6:.0f} GB/s)", flush=True)
        default = next(r for r in rows if r[2] == dict(num_warps=4, num_stages=2, chunks_per_iter=4))
        top = min(rows)
        print(f"{name}: default record {default[0]:.3f} ms (no record {default[1]:.3f}); best record {top[0]:.3f} ms "
              f"with {top[2]}", flush=True)
        best[name] = {"default_ms": default[0], "default_no_record_ms": default[1], "best_ms": top[0],
                      "best_launch": top[2], "one_query_ms": base}
        del k, v
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(best, indent=1))


if __name__ == "__main__":
    main()
