"""Kernel benchmarks (GPU): top-p chunk selection (Triton vs torch sort-based top-p vs torch.topk) and
block-sparse verification attention (Triton vs dense SDPA), bf16.

Prints a table of medians and ratios measured side by side in one run, writes JSON. First checks the kernel
against the sort reference on fresh random inputs (a benchmark of a wrong kernel is worthless).

    python bench/kernels.py --out results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ itself is sys.path[0]: replace it (its kernels.py would shadow the `kernels` package
# that transformers imports where it is installed)
sys.path[0:1] = [str(ROOT)] if Path(sys.path[0]).resolve() == ROOT / "bench" else [str(ROOT), sys.path[0]]

from specattn_runtime.selection import select_chunks  # noqa: E402
from specattn_runtime.selection.triton_select import indices_to_mask, topp_select_triton  # noqa: E402
from specattn_runtime.sparse import sparse_attention_reference  # noqa: E402
from specattn_runtime.sparse.triton_attn import mask_to_indices, sparse_attention_triton  # noqa: E402


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


def bench_graph(fn, args, calls: int = 20) -> float:
    """Median microseconds per call with launch overhead removed: ``calls`` calls captured in one CUDA graph."""
    import triton

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(*args)
    return triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median") * 1e3 / calls


RADIX_BITS = (1, 2, 4)  # threshold bits fixed per search pass; 1 = bisection


def check(dev: str, gen: torch.Generator) -> None:
    for (rows, c), bits in itertools.product(((256, 128), (64, 2048), (16, 8192)), (None, *RADIX_BITS)):
        scores = torch.softmax(torch.randn(rows, c, generator=gen) * 4, -1)
        p = torch.rand(rows, generator=gen) * 0.5 + 0.5
        n_valid = torch.randint(1, c + 1, (rows,), generator=gen)
        idx, cnt = topp_select_triton(scores.to(dev), p.to(dev), n_valid.to(dev), radix_bits=bits)
        ref = select_chunks(scores.double().float(), p, n_valid, method="sort")
        got = indices_to_mask(idx.cpu(), cnt.cpu(), c)
        bad = int((got != ref).any(-1).sum())
        valid = torch.arange(c)[None, :] < n_valid[:, None]
        kept = (scores.double() * got).sum(-1) / (scores.double() * valid).sum(-1)
        print(f"check rows={rows} chunks={c} bits/pass={bits or 'default'}: {bad} rows differ from the sort reference, "
              f"min kept mass - p = {float((kept - p.double()).min()):.2e}")
        # float32 sums on device vs float64 cumsum in the reference may split a boundary tie; more is a bug
        if bad > rows // 100:
            raise SystemExit("kernel disagrees with the reference: not benchmarking")


def copy_bandwidth(dev: str) -> float:
    """Measured device-to-device copy bandwidth, bytes read + written per second."""
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=dev).normal_()
    y = torch.empty_like(x)
    t = bench(lambda a, b: b.copy_(a), [(x, y)]) * 1e-6
    return 2 * x.numel() * 2 / t


def check_attention(dev: str, gen: torch.Generator) -> None:
    for h, hkv, tq, tk in ((32, 8, 8, 5000), (32, 32, 1, 3000)):
        q = torch.randn(1, h, tq, 128, generator=gen).to(dev, torch.bfloat16)
        k = torch.randn(1, hkv, tk, 128, generator=gen).to(dev, torch.bfloat16)
        v = torch.randn(1, hkv, tk, 128, generator=gen).to(dev, torch.bfloat16)
        mask = torch.rand(1, -(-tk // 16), generator=gen) < 0.25
        mask[:, 0] = True
        mask[:, (tk - tq) // 16 :] = True
        mask = mask.to(dev)
        idx, cnt = mask_to_indices(mask)
        out = sparse_attention_triton(q, k, v, idx, cnt, chunk_size=16)
        ref = sparse_attention_reference(q.double(), k.double(), v.double(), mask, 16)
        err = float((out.double() - ref).norm() / ref.norm())
        print(f"check attention H={h} Hkv={hkv} q={tq} keys={tk}: rel err {err:.2e}")
        if not err < 1e-2:
            raise SystemExit("attention kernel disagrees with the reference: not benchmarking")


def bench_attention(dev: str, gen: torch.Generator, contexts, copy_bw: float) -> list[dict]:
    results = []
    for name, h, hkv in (("MHA", 32, 32), ("GQA", 32, 8)):
        for tk in contexts:
            c = tk // 16
            k = torch.randn(1, hkv, tk, 128, device=dev, dtype=torch.bfloat16)
            v = torch.randn(1, hkv, tk, 128, device=dev, dtype=torch.bfloat16)
            for tq in (1, 8):
                q = torch.randn(1, h, tq, 128, device=dev, dtype=torch.bfloat16)
                # dense baseline: all keys, no mask (the 8 drafted queries' causality ignored: flash path)
                t_dense = bench(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, enable_gqa=h != hkv), [(q, k, v)])
                for density in (0.1, 0.25, 0.5):
                    sets = []
                    for _ in range(3):
                        m = torch.rand(1, c, device=dev) < density
                        m[:, 0] = True
                        m[:, (tk - tq) // 16 :] = True
                        sets.append(mask_to_indices(m))
                    t_sparse = bench(lambda i, n: sparse_attention_triton(q, k, v, i, n, chunk_size=16), sets)
                    sel_bytes = 2 * hkv * 128 * 2 * float(sets[0][1].sum()) * 16
                    results.append({"layout": name, "heads": h, "kv_heads": hkv, "keys": tk, "q_len": tq,
                                    "density": density, "dense_sdpa_us": t_dense, "triton_sparse_us": t_sparse,
                                    "speedup": t_dense / t_sparse,
                                    "selected_bw_frac": sel_bytes / (t_sparse * 1e-6) / copy_bw})
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/kernels.json")
    ap.add_argument("--rows", type=int, default=32 * 8, help="layers x queries")
    ap.add_argument("--contexts", default="4096,16384,65536,131072")
    ap.add_argument("--sections", default="selection,attention,overhead,paged,flashinfer",
                    help="comma-separated subset to run")
    ap.add_argument("--sweep-keys", default="2048,8192,32768,131072", help="key counts of the sweep section")
    ap.add_argument("--decode-keys", default="8192,32768,131072", help="key counts of the decode section")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    check(dev, gen)
    check_attention(dev, gen)
    copy_bw = copy_bandwidth(dev)
    doc = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "copy_bw_bytes_s": copy_bw,
                    "sections": sorted(sections)}}

    def save(key, value):  # after every section: a run cut short keeps what it measured
        doc[key] = value
        Path(args.out).write_text(json.dumps(doc, indent=1))

    if "selection" in sections:
        save("selection", bench_selection(dev, gen, args.rows))
    if "attention" in sections:
        save("attention", bench_attention(dev, gen, [int(x) for x in args.contexts.split(",")], copy_bw))
        print(f"\nblock-sparse verification attention, bf16, head_dim 128, median us; copy bandwidth "
              f"{copy_bw / 1e12:.2f} TB/s; dense = SDPA over all keys")
        print(f"{'layout':>6} {'keys':>7} {'q':>2} {'density':>7} {'dense':>8} {'sparse':>8} {'speedup':>8} "
              f"{'sel.bw/copy':>11}")
        for r in doc["attention"]:
            print(f"{r['layout']:>6} {r['keys']:>7} {r['q_len']:>2} {r['density']:>7.2f} "
                  f"{r['dense_sdpa_us']:>8.1f} {r['triton_sparse_us']:>8.1f} {r['speedup']:>8.2f} "
                  f"{r['selected_bw_frac']:>11.2f}")
    if "overhead" in sections:
        overhead = {name: selection_overhead(dev, sharpness, p) for name, sharpness, p in
                    (("peaked_p0.97", 4.0, 0.97), ("flat_p0.3", 0.5, 0.3))}
        print(f"\nper layer at 32K keys, GQA 32/8, q_len 8 (CUDA graph, us): {json.dumps(overhead, indent=1)}")
        overhead["per_step"] = {name: step_overhead(dev, sharpness, p) for name, sharpness, p in
                                (("peaked_p0.97", 4.0, 0.97), ("flat_p0.3", 0.5, 0.3))}
        print(f"\none verification step, 32 layers at 32K keys: one selection launch (32 rows) + 32 sparse "
              f"attentions vs the 32 attentions alone (CUDA graph, us): {json.dumps(overhead['per_step'], indent=1)}")
        save("selection_overhead_32k", overhead)
    if "paged" in sections:
        save("paged_attention", bench_paged(dev, copy_bw))
        print("\npaged vs contiguous KV cache, sparse attention at 25% density, q_len 8, median us")
        print(f"{'layout':>6} {'keys':>7} {'page':>5} {'contiguous':>11} {'paged':>8} {'paged/contig':>13} "
              f"{'sel.bw/copy':>11}")
        for r in doc["paged_attention"]:
            print(f"{r['layout']:>6} {r['keys']:>7} {r['page_size']:>5} {r['contiguous_us']:>11.1f} "
                  f"{r['paged_us']:>8.1f} {r['paged_over_contiguous']:>13.2f} {r['selected_bw_frac']:>11.2f}")
    if "flashinfer" in sections:
        save("flashinfer", flashinfer_attempt(dev, gen))
        print(f"\nFlashInfer: {json.dumps(doc['flashinfer'])}")
    if "decode" in sections:
        save("decode", bench_decode(dev, copy_bw, [int(x) for x in args.decode_keys.split(",")]))
    if "sweep" in sections:  # last: the longest section
        save("selection_sweep", selection_sweep(dev, gen, [int(k) for k in args.sweep_keys.split(",")]))


def bench_selection(dev: str, gen: torch.Generator, rows: int) -> list[dict]:
    """Triton vs sort top-p vs torch.topk, eager (rotating inputs) and in CUDA graphs; prints the table."""
    results = []
    for keys in (2048, 8192, 32768, 131072):
        c = keys // 16
        sets = []
        for _ in range(4):
            s = torch.softmax(torch.randn(rows, c, generator=gen) * 3, -1).to(dev)
            sets.append((s, torch.full((rows,), 0.97, device=dev),
                         torch.full((rows,), c, device=dev, dtype=torch.int32)))
        idx = torch.empty(rows, c, dtype=torch.int32, device=dev)
        cnt = torch.empty(rows, dtype=torch.int32, device=dev)
        k = max(1, c // 4)
        t_triton = bench(lambda s, p, n: topp_select_triton(s, p, n, out_idx=idx, out_count=cnt), sets)
        t_sort = bench(lambda s, p, n: sort_topp(s, p), sets)
        t_topk = bench(lambda s, p, n: torch.topk(s, k, dim=-1), sets)
        g_triton = bench_graph(lambda s, p, n: topp_select_triton(s, p, n, out_idx=idx, out_count=cnt), sets[0])
        g_sort = bench_graph(lambda s, p, n: sort_topp(s, p), sets[0])
        # the same kernel with 1 (bisection), 2 and 4 threshold bits per dependent pass, side by side
        by_bits = {b: bench_graph(lambda s, p, n, b=b: topp_select_triton(s, p, n, out_idx=idx, out_count=cnt,
                                                                          radix_bits=b), sets[0]) for b in RADIX_BITS}
        results.append({"keys": keys, "chunks": c, "rows": rows, "triton_us": t_triton, "sort_topp_us": t_sort,
                        "graph_triton_us_by_radix_bits": by_bits,
                        "topk_us": t_topk, "sort_over_triton": t_sort / t_triton, "topk_over_triton": t_topk / t_triton,
                        "graph_triton_us": g_triton, "graph_sort_topp_us": g_sort,
                        "graph_sort_over_triton": g_sort / g_triton})
    print(f"\nselection, rows={rows} (layers x queries), chunk 16, p=0.97, median us "
          f"({torch.cuda.get_device_name()}, torch {torch.__version__})")
    print(f"{'keys':>7} {'chunks':>6} {'triton':>9} {'sort top-p':>11} {'topk(c/4)':>10} {'sort/triton':>12} "
          f"{'topk/triton':>12} {'graph triton':>13} {'graph sort':>11} {'graph sort/triton':>18}")
    for r in results:
        print(f"{r['keys']:>7} {r['chunks']:>6} {r['triton_us']:>9.1f} {r['sort_topp_us']:>11.1f} "
              f"{r['topk_us']:>10.1f} {r['sort_over_triton']:>12.2f} {r['topk_over_triton']:>12.2f} "
              f"{r['graph_triton_us']:>13.1f} {r['graph_sort_topp_us']:>11.1f} {r['graph_sort_over_triton']:>18.2f}"
              f"   graph us by bits/pass: { {b: round(t, 1) for b, t in r['graph_triton_us_by_radix_bits'].items()} }")
    return results


def selection_sweep(dev: str, gen: torch.Generator, keys_list) -> list[dict]:
    """Graph us of the selection kernel over (radix bits, num_warps) per row length, for the bench's 256 rows and
    the runtime's one row per layer (32), on peaked and flat rows: what :func:`launch_config` is chosen from."""
    results = []
    cases = [(keys, rows, dist) for keys in keys_list
             for rows, dist in ((256, ("peaked", 3.0, 0.97)), (256, ("flat", 0.5, 0.9)), (32, ("peaked", 3.0, 0.97)))]
    for keys, rows, (dist, sharpness, p_value) in cases:
        c = keys // 16
        s = torch.softmax(torch.randn(rows, c, generator=gen) * sharpness, -1).to(dev)
        p = torch.full((rows,), p_value, device=dev)
        n = torch.full((rows,), c, device=dev, dtype=torch.int32)
        idx = torch.empty(rows, c, dtype=torch.int32, device=dev)
        cnt = torch.empty(rows, dtype=torch.int32, device=dev)
        row = {"keys": keys, "rows": rows, "dist": dist, "p": p_value,
               "sort_topp_us": bench_graph(lambda: sort_topp(s, p), ())}
        for bits, warps in itertools.product((1, 2), (1, 2, 4, 8, 16)):
            if c >= 8192 and warps <= 2:
                continue  # 10-20x slower on 8K-chunk rows (old_w1/old_w2 in bench/selection_search_sweep_h100.json)
            row[f"b{bits}_w{warps}"] = bench_graph(lambda: topp_select_triton(
                s, p, n, out_idx=idx, out_count=cnt, radix_bits=bits, num_warps=warps), ())
        best = min((k for k in row if k.startswith("b")), key=row.get)
        row["default_us"] = bench_graph(lambda: topp_select_triton(s, p, n, out_idx=idx, out_count=cnt), ())
        print(f"sweep keys={keys} rows={rows} {dist}: sort {row['sort_topp_us']:.1f} us, default "
              f"{row['default_us']:.1f} us, best "
              f"{best} {row[best]:.1f} us; " + " ".join(f"{k}={v:.1f}" for k, v in row.items() if k.startswith("b")))
        results.append(row)
    return results


def selection_overhead(dev: str, sharpness: float, p_value: float) -> dict:
    """Selection (one row: this layer's summed draft attention) + sparse attention vs the attention alone.
    ``sharpness`` scales the random logits of the row (peaked vs flat: low vs ~25% density)."""
    tk, h, hkv, tq = 32768, 32, 8, 8
    c = tk // 16
    q = torch.randn(1, h, tq, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, tk, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, hkv, tk, 128, device=dev, dtype=torch.bfloat16)
    scores = torch.softmax(torch.randn(1, c, device=dev) * sharpness, -1)
    p = torch.tensor([p_value], device=dev)
    n_valid = torch.tensor([c], device=dev, dtype=torch.int32)
    idx = torch.empty(1, c, dtype=torch.int32, device=dev)
    cnt = torch.empty(1, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)

    def select_and_attend():
        topp_select_triton(scores, p, n_valid, keep_recent=1, out_idx=idx, out_count=cnt)
        sparse_attention_triton(q, k, v, idx, cnt, chunk_size=16, out=out)

    select_and_attend()
    density = float(cnt.item()) / c
    t_attn = bench_graph(lambda: sparse_attention_triton(q, k, v, idx, cnt, chunk_size=16, out=out), ())
    t_both = bench_graph(select_and_attend, ())
    t_sel = bench_graph(lambda: topp_select_triton(scores, p, n_valid, out_idx=idx, out_count=cnt), ())
    t_dense = bench_graph(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True), ())
    return {"density": density, "select_us": t_sel, "attention_us": t_attn, "select_plus_attention_us": t_both,
            "dense_sdpa_us": t_dense, "selection_overhead_frac": (t_both - t_attn) / t_attn}


def step_overhead(dev: str, sharpness: float, p_value: float, layers: int = 32) -> dict:
    """How the runtime spends selection: one launch selects for every layer of the step (one row per layer),
    then each layer's sparse attention reads its own K/V (distinct per layer, as in a model: no cache reuse)."""
    tk, h, hkv, tq = 32768, 32, 8, 8
    c = tk // 16
    q = torch.randn(1, h, tq, 128, device=dev, dtype=torch.bfloat16)
    kvs = [(torch.randn(1, hkv, tk, 128, device=dev, dtype=torch.bfloat16),
            torch.randn(1, hkv, tk, 128, device=dev, dtype=torch.bfloat16)) for _ in range(layers)]
    scores = torch.softmax(torch.randn(layers, c, device=dev) * sharpness, -1)
    p = torch.full((layers,), p_value, device=dev)
    n_valid = torch.full((layers,), c, device=dev, dtype=torch.int32)
    idx = torch.empty(layers, c, dtype=torch.int32, device=dev)
    cnt = torch.empty(layers, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)

    def attend():
        for i, (k, v) in enumerate(kvs):
            sparse_attention_triton(q, k, v, idx[i : i + 1], cnt[i : i + 1], chunk_size=16, out=out)

    def select_and_attend():
        topp_select_triton(scores, p, n_valid, keep_recent=1, out_idx=idx, out_count=cnt)
        attend()

    select_and_attend()
    density = float(cnt.sum()) / (layers * c)
    t_attn = bench_graph(attend, (), calls=2)
    t_both = bench_graph(select_and_attend, (), calls=2)
    t_sel = bench_graph(lambda: topp_select_triton(scores, p, n_valid, out_idx=idx, out_count=cnt), ())
    return {"layers": layers, "density": density, "select_us": t_sel, "attention_us": t_attn,
            "select_plus_attention_us": t_both, "selection_overhead_frac": (t_both - t_attn) / t_attn}


def bench_paged(dev: str, copy_bw: float) -> list[dict]:
    """The sparse kernel on a paged cache (pages shuffled in the pool) vs the same keys stored contiguously,
    both in CUDA graphs."""
    gen = torch.Generator(device=dev).manual_seed(0)
    results = []
    for (name, h, hkv), tk, page in itertools.product((("MHA", 32, 32), ("GQA", 32, 8)), (16384, 65536), (16, 64)):
        tq, c = 8, tk // 16
        k = torch.randn(1, hkv, tk, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, hkv, tk, 128, device=dev, dtype=torch.bfloat16)
        q = torch.randn(1, h, tq, 128, device=dev, dtype=torch.bfloat16)
        n_pages = tk // page
        order = torch.randperm(n_pages, device=dev, generator=gen)
        k_pool = torch.empty(n_pages, page, hkv, 128, device=dev, dtype=torch.bfloat16)
        v_pool = torch.empty_like(k_pool)
        k_pool[order] = k[0].transpose(0, 1).reshape(n_pages, page, hkv, 128)
        v_pool[order] = v[0].transpose(0, 1).reshape(n_pages, page, hkv, 128)
        table = order.to(torch.int32)[None]
        lens = torch.tensor([tk], device=dev, dtype=torch.int32)
        m = torch.rand(1, c, device=dev, generator=gen) < 0.25
        m[:, 0] = True
        m[:, (tk - tq) // 16 :] = True
        idx, cnt = mask_to_indices(m)
        ref = sparse_attention_triton(q, k, v, idx, cnt, chunk_size=16)
        got = sparse_attention_triton(q, k_pool, v_pool, idx, cnt, chunk_size=16, page_table=table, kv_lens=lens)
        err = float((got.float() - ref.float()).norm() / ref.float().norm())
        if not err < 1e-2:
            raise SystemExit(f"paged attention disagrees with contiguous ({err:.2e}): not benchmarking")
        # in CUDA graphs: the host-side launch cost (identical for both) would otherwise dominate the difference
        t_contig = bench_graph(lambda: sparse_attention_triton(q, k, v, idx, cnt, chunk_size=16), ())
        t_paged = bench_graph(lambda: sparse_attention_triton(q, k_pool, v_pool, idx, cnt, chunk_size=16,
                                                              page_table=table, kv_lens=lens), ())
        sel_bytes = 2 * hkv * 128 * 2 * float(cnt.sum()) * 16
        results.append({"layout": name, "keys": tk, "page_size": page, "q_len": tq, "density": 0.25,
                        "contiguous_us": t_contig, "paged_us": t_paged, "paged_over_contiguous": t_paged / t_contig,
                        "rel_diff_paged_vs_contiguous": err,
                        "selected_bw_frac": sel_bytes / (t_paged * 1e-6) / copy_bw})
    return results


def flashinfer_attempt(dev: str, gen: torch.Generator) -> dict:
    """Try FlashInfer's BlockSparseAttentionWrapper (when carried): correctness at q_len 1, plan and run times."""
    import time

    try:
        from specattn_runtime.sparse.flashinfer_backend import FlashInferSparse
        import flashinfer

        version = getattr(flashinfer, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        return {"available": False, "error": repr(e)[:500]}
    rows = []
    for tk, hkv, tq in ((65536, 32, 1), (65536, 8, 1), (65536, 8, 8)):
        try:
            q = torch.randn(1, 32, tq, 128, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, hkv, tk, 128, device=dev, dtype=torch.bfloat16)
            v = torch.randn(1, hkv, tk, 128, device=dev, dtype=torch.bfloat16)
            m = torch.rand(1, tk // 16, device=dev) < 0.25
            m[:, 0] = True
            m[:, -1] = True
            idx, cnt = mask_to_indices(m)
            fi = FlashInferSparse(dev)
            t0 = time.perf_counter()
            fi.plan(idx, cnt, q_len=tq, n_keys=tk, num_qo_heads=32, num_kv_heads=hkv, head_dim=128, chunk_size=16,
                    dtype=torch.bfloat16)
            torch.cuda.synchronize()
            first_plan_s = time.perf_counter() - t0  # includes JIT compilation the first time
            qf, kf, vf = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(), \
                v[0].transpose(0, 1).contiguous()
            o = fi.run(qf, kf, vf)
            err = None
            if tq == 1:
                ref = sparse_attention_reference(q.double(), k.double(), v.double(), m, 16)
                err = float((o.transpose(0, 1)[None].double() - ref).norm() / ref.norm())
            t_run = bench(lambda a, b, c_: fi.run(a, b, c_), [(qf, kf, vf)])
            t_plan = bench(lambda i, n: fi.plan(i, n, q_len=tq, n_keys=tk, num_qo_heads=32, num_kv_heads=hkv,
                                                head_dim=128, chunk_size=16, dtype=torch.bfloat16), [(idx, cnt)])
            t_ours = bench(lambda i, n: sparse_attention_triton(q, k, v, i, n, chunk_size=16), [(idx, cnt)])
            rows.append({"keys": tk, "kv_heads": hkv, "q_len": tq, "rel_err_q1": err, "first_plan_s": first_plan_s,
                         "plan_us": t_plan, "run_us": t_run, "triton_us": t_ours})
        except Exception as e:  # noqa: BLE001
            rows.append({"keys": tk, "kv_heads": hkv, "q_len": tq, "error": repr(e)[:800]})
    return {"available": True, "version": version, "rows": rows}



# (query heads, KV heads, head_dim) of the end-to-end pairs' models (bench/e2e.py)
DECODE_LAYOUTS = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128), "tinyllama-1.1b": (32, 4, 64),
                  "llama3.2-1b": (32, 8, 64)}
DECODE_CONFIGS = [(cpi, w, st) for cpi in (4, 8) for w in (4, 8) for st in (2, 3)]  # chunks/tile, warps, stages


def bench_decode(dev: str, copy_bw: float, keys_list, sweep_keys: int = 32768) -> list[dict]:
    """The decode engine's dense attention (the split-K kernel reading every chunk up to a device-side length, over
    a cache 2,048 positions longer than the keys) vs SDPA over exactly the keys, q_len 1 (a decode step) and 5
    (a k = 4 verification), CUDA graphs. At ``sweep_keys`` every launch setting is timed, elsewhere the default;
    also the cost of recording chunk-pooled attention in the same kernel (the draft's mapped layers)."""
    import torch.nn.functional as F

    rows = []
    print(f"\ndense decode attention over a preallocated cache, bf16, us (CUDA graph); copy {copy_bw / 1e12:.2f} TB/s")
    print(f"{'layout':>15} {'keys':>7} {'q':>2} {'sdpa':>8} {'ours':>8} {'best':>8} {'best cfg':>12} {'record':>8} "
          f"{'bw/copy':>8}")
    for name, (h, hkv, d) in DECODE_LAYOUTS.items():
        for keys in keys_list:
            cap = keys + 2048
            k = torch.randn(1, hkv, cap, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            lens = torch.tensor([keys], dtype=torch.int32, device=dev)
            for tq in (1, 5):
                q = torch.randn(1, h, tq, d, device=dev, dtype=torch.bfloat16)
                out = torch.empty_like(q)
                ks, vs = k[:, :, :keys], v[:, :, :keys]
                ref = F.scaled_dot_product_attention(q, ks, vs, enable_gqa=h != hkv) if tq == 1 else None
                t_sdpa = bench_graph(lambda: F.scaled_dot_product_attention(q, ks, vs, enable_gqa=h != hkv), ())
                timings = {}
                for cfg in DECODE_CONFIGS if keys == sweep_keys else [(4, 4, 2)]:
                    def run(cfg=cfg):
                        sparse_attention_triton(q, k, v, None, None, chunk_size=16, kv_lens=lens, out=out,
                                                chunks_per_iter=cfg[0], num_warps=cfg[1], num_stages=cfg[2])
                    run()
                    if ref is not None:
                        err = float((out.float() - ref.float()).norm() / ref.float().norm())
                        assert err < 2e-2, f"{name} {keys} {cfg}: relative error {err:.2e}"
                    timings[cfg] = bench_graph(run, ())
                best = min(timings, key=timings.get)
                rec = torch.zeros(1, -(-cap // 16), device=dev)
                t_rec = bench_graph(lambda: sparse_attention_triton(q, k, v, None, None, chunk_size=16, kv_lens=lens,
                                                                    out=out, record=rec), ()) if tq == 1 else None
                kv_bytes = 2 * hkv * keys * d * 2
                row = {"layout": name, "keys": keys, "q_len": tq, "sdpa_us": t_sdpa, "ours_us": timings[(4, 4, 2)],
                       "best_us": timings[best], "best_cfg": list(best), "record_us": t_rec,
                       "all_cfg_us": {str(c): t for c, t in timings.items()},
                       "kv_bw_frac": kv_bytes / (timings[best] * 1e-6 * copy_bw)}
                rows.append(row)
                print(f"{name:>15} {keys:>7} {tq:>2} {t_sdpa:>8.1f} {row['ours_us']:>8.1f} {row['best_us']:>8.1f} "
                      f"{str(best):>12} {t_rec or 0:>8.1f} {row['kv_bw_frac']:>8.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
