"""Temporary: previous radix-2 kernel (commit d0e4bfe) vs the new one over a launch sweep, same run (not committed)."""
import sys, json, os, itertools
from pathlib import Path
import torch, triton, triton.language as tl
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _old_radix_kernel import _topp_select_kernel as old
from kernels import bench_graph, sort_topp
from specattn_runtime.selection.triton_select import topp_select_triton, indices_to_mask
from specattn_runtime.selection import select_chunks

@triton.jit
def _empty(x_ptr):
    tl.store(x_ptr + tl.program_id(0), 1.0)

dev = "cuda"
gen = torch.Generator().manual_seed(1)
out = []
x = torch.zeros(256, device=dev)
print("empty triton kernel in a graph, 256 programs:", bench_graph(lambda: _empty[(256,)](x), ()), flush=True)
import specattn_runtime.selection.triton_select as ts
for keys in (2048, 8192, 32768, 131072):
    for rows, sharp, pv in ((256, 3.0, 0.97), (32, 3.0, 0.97), (256, 0.5, 0.9)):
        c = keys // 16
        s = torch.softmax(torch.randn(rows, c, generator=gen) * sharp, -1).to(dev)
        p = torch.full((rows,), pv, device=dev)
        n = torch.full((rows,), c, device=dev, dtype=torch.int32)
        idx = torch.empty(rows, c, dtype=torch.int32, device=dev)
        cnt = torch.empty(rows, dtype=torch.int32, device=dev)
        block = max(16, triton.next_power_of_2(c))
        r = dict(keys=keys, rows=rows, sharp=sharp)
        for w in (1, 2, 4, 8):
            r[f"old_w{w}"] = bench_graph(lambda: old[(rows,)](s, p, n, idx, cnt, c, s.stride(0), idx.stride(0), KEEP_SINK=True,
                                                   KEEP_RECENT=1, BLOCK=block, RADIX_BITS=2, num_warps=w), ())
        r["sort"] = bench_graph(lambda: sort_topp(s, p), ())
        ref = select_chunks(s.double().float().cpu(), p.cpu(), n.cpu(), method="sort")
        for splits, w, pair, terms in itertools.product((4, 8, 16), (1, 2, 4, 8), (False, True), (16, 64)):
            ts.TERMS_PER_THREAD = terms
            tile = min(block, max(16, terms * 32 * w // (2 * splits)))
            if (pair and (tile < block or w > 1)) or (terms == 64 and (w > 2 or tile == min(block, max(16, 16 * 32 * w // (2 * splits))))):
                continue  # pair only on the register path; terms 64 only where it changes the tile
            f = lambda: topp_select_triton(s, p, n, out_idx=idx, out_count=cnt, splits=splits, num_warps=w, pair_reduce=pair)
            f()
            name = f"s{splits}w{w}{'P' if pair else ''}{'T' if terms == 64 else ''}"
            bad = int((indices_to_mask(idx.cpu(), cnt.cpu(), c) != ref).any(-1).sum())
            r[name] = round(bench_graph(f, ()), 2)
            if bad > max(1, rows // 100):
                r[name + "_BAD"] = bad
        ts.TERMS_PER_THREAD = 16
        cands = {k: v for k, v in r.items() if k.startswith(("s", "old")) and k not in ("sharp", "sort") and not k.endswith("BAD")}
        best = min(cands, key=cands.get)
        print(f"keys={keys} rows={rows} sharp={sharp}: sort {r['sort']:.1f} best {best} {r[best]:.1f} | "
              + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in cands.items()), flush=True)
        out.append(r)
Path(os.environ.get("OUT", "."), "explore.json").write_text(json.dumps(out, indent=1))
