"""Temporary: the bracket-in-(C+1) search (bounds from the row) vs the committed radix kernel, graph us."""
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _explore_sel import bench_graph  # noqa: E402
from _sel_variants import run_v3  # noqa: E402
from kernels import sort_topp  # noqa: E402

from specattn_runtime.selection import select_chunks  # noqa: E402
from specattn_runtime.selection.triton_select import indices_to_mask, topp_select_triton  # noqa: E402

dev = "cuda"
gen = torch.Generator().manual_seed(2)
out = []
for keys in (2048, 8192, 32768, 131072):
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
        warps = {128: (1, 4), 512: (1, 2, 4), 2048: (4, 8), 8192: (8, 16)}[c]
        for w, use_while, log2c in itertools.product(warps, (True, False), (2, 3)):
            f = lambda: run_v3(s, p, n, idx, cnt, warps=w, use_while=use_while, log2c=log2c)
            f()
            name = f"v3{'W' if use_while else 'G'}c{1 << log2c}w{w}"
            bad = int((indices_to_mask(idx.cpu(), cnt.cpu(), c) != ref).any(-1).sum())
            if bad > max(1, rows // 100):
                r[name + "_BAD"] = bad
            r[name] = bench_graph(f)
        cands = {k: v for k, v in r.items() if k.startswith(("prod", "v3")) and not k.endswith("BAD")}
        best = min(cands, key=cands.get)
        print(f"keys={keys} rows={rows} sharp={sharp}: sort {r['sort']:.1f} prod {r['prod']:.2f} best {best} "
              f"{r[best]:.2f} (sort/best {r['sort'] / r[best]:.1f}x, sort/prod {r['sort'] / r['prod']:.1f}x) | "
              + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.items() if k.startswith("v3")), flush=True)
        out.append(r)
        Path(os.environ.get("OUT", "."), "explore_sel2.json").write_text(json.dumps(out, indent=1))
