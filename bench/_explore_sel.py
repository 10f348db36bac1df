"""Temporary: one GPU run comparing selection-kernel variants side by side (graph us), with correctness checks."""
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sel_variants import run_v2  # noqa: E402
from kernels import sort_topp  # noqa: E402

from specattn_runtime.selection import select_chunks  # noqa: E402
from specattn_runtime.selection.triton_select import indices_to_mask, topp_select_triton  # noqa: E402


def bench_graph(fn, calls=20):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return triton.testing.do_bench(graph.replay, warmup=30, rep=150, return_mode="median") * 1e3 / calls


@triton.jit
def _empty(x_ptr):
    tl.store(x_ptr + tl.program_id(0), 1.0)


if __name__ == "__main__":
    dev = "cuda"
    gen = torch.Generator().manual_seed(1)
    out = {"device": torch.cuda.get_device_name(), "cases": []}
    x = torch.zeros(256, device=dev)
    out["empty_us"] = bench_graph(lambda: _empty[(256,)](x))
    print("empty kernel, 256 programs:", round(out["empty_us"], 2), flush=True)
    keys_list = [int(k) for k in os.environ.get("KEYS", "2048,8192,32768,131072").split(",")]
    for keys in keys_list:
        for rows, sharp, pv in ((256, 3.0, 0.97), (256, 0.5, 0.9), (32, 3.0, 0.97)):
            c = keys // 16
            s = torch.softmax(torch.randn(rows, c, generator=gen) * sharp, -1).to(dev)
            p = torch.full((rows,), pv, device=dev)
            n = torch.full((rows,), c, device=dev, dtype=torch.int32)
            idx = torch.empty(rows, c, dtype=torch.int32, device=dev)
            cnt = torch.empty(rows, dtype=torch.int32, device=dev)
            ref = select_chunks(s.cpu(), p.cpu(), n.cpu(), method="sort")
            r = {"keys": keys, "rows": rows, "sharp": sharp, "p": pv}
            r["sort"] = bench_graph(lambda: sort_topp(s, p))
            r["prod"] = bench_graph(lambda: topp_select_triton(s, p, n, out_idx=idx, out_count=cnt))
            long_row = c >= 2048
            warps_list = (2, 4, 8, 16) if c >= 8192 else ((1, 2, 4, 8) if c < 2048 else (2, 4, 8))

            def check(name):
                bad = int((indices_to_mask(idx.cpu(), cnt.cpu(), c) != ref).any(-1).sum())
                if bad > max(1, rows // 100):
                    r[name + "_BAD"] = bad

            for bits, w in itertools.product((2, 3, 4), warps_list):
                if c >= 8192 and bits > 2:
                    continue
                f = lambda: topp_select_triton(s, p, n, out_idx=idx, out_count=cnt, radix_bits=bits, num_warps=w)
                f()
                check(f"prod_b{bits}w{w}")
                r[f"prod_b{bits}w{w}"] = bench_graph(f)
                for early in (True, False):
                    if c >= 8192 and not early:
                        continue
                    g = lambda: run_v2(s, p, n, idx, cnt, bits=bits, warps=w, early=early)
                    g()
                    name = f"v2{'E' if early else 'S'}_b{bits}w{w}"
                    check(name)
                    r[name] = bench_graph(g)
            if c < 8192:
                w = 4 if c <= 512 else 8 if rows < 132 else 4
                for mp in (0, 4, 8):  # timing only: the search truncated after mp passes
                    r[f"trunc{mp}_w{w}"] = bench_graph(lambda: run_v2(s, p, n, idx, cnt, bits=2, warps=w, early=False,
                                                                        max_passes=mp))
            cands = {k: v for k, v in r.items() if k.startswith(("prod", "v2")) and not k.endswith("BAD")}
            best = min(cands, key=cands.get)
            print(f"keys={keys} rows={rows} sharp={sharp}: sort {r['sort']:.1f} prod {r['prod']:.2f} best {best} "
                  f"{r[best]:.2f} (sort/best {r['sort'] / r[best]:.1f}x) | "
                  + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in r.items() if k not in ("keys", "rows", "sharp", "p", "sort", "prod")),
                  flush=True)
            out["cases"].append(r)
            Path(os.environ.get("OUT", "."), "explore_sel.json").write_text(json.dumps(out, indent=1))
