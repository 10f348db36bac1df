"""Temporary (not committed): radix-2 selection kernel, digit pick by reshape/split instead of a max reduction."""
import sys, json, os
from pathlib import Path
import torch, triton
sys.path.insert(0, str(Path(__file__).resolve().parents[1])); sys.path.insert(0, str(Path(__file__).resolve().parent))
from _var_kernel import _topp_select_kernel as var
from kernels import bench_graph, sort_topp
from specattn_runtime.selection.triton_select import topp_select_triton, indices_to_mask, launch_config
from specattn_runtime.selection import select_chunks
gen = torch.Generator().manual_seed(2)
out = []
for keys in (2048, 8192, 32768, 131072):
    for rows in (256, 32):
        c = keys // 16
        s = torch.softmax(torch.randn(rows, c, generator=gen) * 3, -1).to("cuda")
        p = torch.full((rows,), 0.97, device="cuda"); n = torch.full((rows,), c, device="cuda", dtype=torch.int32)
        idx = torch.empty(rows, c, dtype=torch.int32, device="cuda"); cnt = torch.empty(rows, dtype=torch.int32, device="cuda")
        block = max(16, triton.next_power_of_2(c)); _, w = launch_config(block, rows, s.device)
        f = lambda: var[(rows,)](s, p, n, idx, cnt, c, s.stride(0), idx.stride(0), KEEP_SINK=True, KEEP_RECENT=1, BLOCK=block, RADIX_BITS=2, num_warps=w)
        f()
        bad = int((indices_to_mask(idx.cpu(), cnt.cpu(), c) != select_chunks(s.double().float().cpu(), p.cpu(), n.cpu(), method="sort")).any(-1).sum())
        r = dict(keys=keys, rows=rows, warps=w, variant_us=bench_graph(f, ()), current_us=bench_graph(lambda: topp_select_triton(s, p, n, out_idx=idx, out_count=cnt), ()), sort_us=bench_graph(lambda: sort_topp(s, p), ()), variant_rows_differ=bad)
        print(r, flush=True); out.append(r)
Path(os.environ["OUT"], "var.json").write_text(json.dumps(out, indent=1))
