"""Block-sparse attention reference against a naive float64 softmax over exactly the selected keys."""

import math

import pytest
import torch

from specattn_runtime.sparse import sparse_attention

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def naive(q, k, v, chunk_mask, chunk_size):
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out = torch.empty(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hkv)
            for qi in range(tq):
                pos = tk - tq + qi
                keys = [t for t in range(pos + 1) if chunk_mask[bi, t // chunk_size]]
                s = q[bi, hi, qi].double() @ k[bi, kh, keys].double().T / math.sqrt(d)
                out[bi, hi, qi] = torch.softmax(s, -1) @ v[bi, kh, keys].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,h,hkv,tq,tk,d,chunk", [(1, 4, 4, 1, 63, 16, 16), (2, 6, 2, 5, 100, 60, 16),
                                                  (1, 9, 3, 7, 37, 64, 8)])
def test_matches_naive(dtype, b, h, hkv, tq, tk, d, chunk, gen):
    q = torch.randn(b, h, tq, d, generator=gen, dtype=dtype)
    k = torch.randn(b, hkv, tk, d, generator=gen, dtype=dtype)
    v = torch.randn(b, hkv, tk, d, generator=gen, dtype=dtype)
    c = -(-tk // chunk)
    mask = torch.rand(b, c, generator=gen) < 0.4
    mask[:, (tk - tq) // chunk :] = True  # the verified positions' chunks are always selected
    out = sparse_attention(q, k, v, mask, chunk_size=chunk)
    assert torch.isfinite(out).all()
    ref = naive(q, k, v, mask, chunk)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < TOL[dtype], f"relative error {err:.2e} (max abs {(out.double() - ref).abs().max():.2e})"


def test_query_without_keys_is_refused():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 40, 8)
    mask = torch.tensor([[True, True, False]])  # the query's own chunk (2) is not selected
    with pytest.raises(ValueError, match="newest chunk"):
        sparse_attention(q, k, k, mask, chunk_size=16)
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, k, k, torch.ones(1, 3, dtype=torch.bool), chunk_size=16, backend="cuda-magic")


@pytest.mark.parametrize("b,h,hkv,tq,tk,d,splits", [(1, 4, 4, 1, 63, 16, 1), (2, 8, 2, 5, 150, 32, 3),
                                                    (1, 6, 3, 8, 97, 64, None)])
def test_triton_kernel_matches_naive(b, h, hkv, tq, tk, d, splits, gen):
    """The Triton kernel (interpreter on CPU) against naive float64 attention; poisoned output buffer."""
    from specattn_runtime.sparse.triton_attn import mask_to_indices, sparse_attention_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    q = torch.randn(b, h, tq, d, generator=gen).to(dev, dtype)
    k = torch.randn(b, hkv, tk, d, generator=gen).to(dev, dtype)
    v = torch.randn(b, hkv, tk, d, generator=gen).to(dev, dtype)
    c = -(-tk // 16)
    mask = torch.rand(b, c, generator=gen) < 0.5
    mask[:, 0] = True
    mask[:, (tk - tq) // 16 :] = True
    idx, count = mask_to_indices(mask.to(dev))
    out = torch.full_like(q, float("nan"))
    sparse_attention_triton(q, k, v, idx, count, chunk_size=16, num_splits=splits, out=out)
    assert torch.isfinite(out).all(), "unwritten or NaN outputs"
    ref = naive(q.cpu().double(), k.cpu().double(), v.cpu().double(), mask, 16)
    err = (out.cpu().double() - ref).norm() / ref.norm()
    assert err < (5e-3 if dtype == torch.float16 else 1e-5), f"relative error {err:.2e}"


@pytest.mark.parametrize("h,hkv,tq,tk", [(6, 3, 5, 150), (4, 1, 1, 70)])
def test_per_kv_head_selection_triton_and_torch_match_naive(h, hkv, tq, tk, gen):
    """One selection per KV head: the Triton kernel (interpreter on CPU; index and count strides per head) and the
    torch backend against naive attention with each query head reading its KV head's chunks."""
    from specattn_runtime.sparse.triton_attn import mask_to_indices, sparse_attention_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(1, h, tq, 32, generator=gen), torch.randn(1, hkv, tk, 32, generator=gen),
               torch.randn(1, hkv, tk, 32, generator=gen))
    c = -(-tk // 16)
    mask = torch.rand(1, hkv, c, generator=gen) < 0.4
    mask[..., 0] = True
    mask[..., (tk - tq) // 16 :] = True
    ref = torch.cat([naive(q[:, i : i + 1].double(), k[:, i * hkv // h : i * hkv // h + 1].double(),
                           v[:, i * hkv // h : i * hkv // h + 1].double(), mask[:, i * hkv // h], 16)
                     for i in range(h)], dim=1)
    out = torch.full_like(q, float("nan")).to(dev)
    sparse_attention_triton(q.to(dev), k.to(dev), v.to(dev), *mask_to_indices(mask.to(dev)), chunk_size=16, out=out)
    for got in (out.cpu(), sparse_attention(q, k, v, mask, chunk_size=16)):
        assert torch.isfinite(got).all()
        err = (got.double() - ref).norm() / ref.norm()
        assert err < 1e-5, f"relative error {err:.2e}"
    if hkv > 1:  # heads really read different chunks
        shared = sparse_attention(q, k, v, mask.any(1), chunk_size=16)
        assert (shared - out.cpu()).abs().max() > 1e-3


def test_index_and_mask_selections_agree(gen):
    """Both selection forms reach every backend: a kernel's (idx, count) and a bool mask give the same output."""
    from specattn_runtime.sparse.triton_attn import mask_to_indices

    q, k, v = (torch.randn(1, 4, 3, 16, generator=gen), torch.randn(1, 2, 70, 16, generator=gen),
               torch.randn(1, 2, 70, 16, generator=gen))
    mask = torch.tensor([[True, False, True, False, True]])
    by_mask = sparse_attention(q, k, v, mask, chunk_size=16)
    by_idx = sparse_attention(q, k, v, mask_to_indices(mask), chunk_size=16)
    torch.testing.assert_close(by_idx, by_mask, rtol=0, atol=0)


def paged_case(gen, lens, h, hkv, tq, d, page_size, dtype=torch.float32):
    """A paged cache holding ragged sequences ``lens`` in shuffled pool pages; every pool row no sequence owns
    (spare pages, the tail of each last page) is NaN, so reading one poisons the output."""
    pages_per_seq = [-(-n // page_size) for n in lens]
    n_pages = sum(pages_per_seq) + 3
    order = torch.randperm(n_pages, generator=gen)
    table = torch.zeros(len(lens), max(pages_per_seq), dtype=torch.int32)
    k_pool = torch.full((n_pages, page_size, hkv, d), float("nan"), dtype=dtype)
    v_pool = torch.full_like(k_pool, float("nan"))
    k_seqs, v_seqs, used = [], [], 0
    for b, n in enumerate(lens):
        k = torch.randn(1, hkv, n, d, generator=gen, dtype=dtype)
        v = torch.randn(1, hkv, n, d, generator=gen, dtype=dtype)
        k_seqs.append(k)
        v_seqs.append(v)
        for j in range(pages_per_seq[b]):
            page = int(order[used])
            used += 1
            table[b, j] = page
            rows = slice(j * page_size, min(n, (j + 1) * page_size))
            k_pool[page, : rows.stop - rows.start] = k[0, :, rows].transpose(0, 1)
            v_pool[page, : rows.stop - rows.start] = v[0, :, rows].transpose(0, 1)
    q = torch.randn(len(lens), h, tq, d, generator=gen, dtype=dtype)
    c = -(-max(lens) // 16)
    mask = torch.rand(len(lens), c, generator=gen) < 0.4
    for b, n in enumerate(lens):
        mask[b, 0] = True
        mask[b, (n - tq) // 16 : -(-n // 16)] = True  # the verified positions' chunks
        mask[b, -(-n // 16) :] = False  # past the sequence: never selected
    return q, k_pool, v_pool, table, torch.tensor(lens), mask, k_seqs, v_seqs


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lens,h,hkv,tq,page_size", [([150, 37, 96], 4, 2, 5, 32), ([64, 200], 6, 3, 1, 16)])
def test_paged_cache_matches_naive(backend, lens, h, hkv, tq, page_size, gen):
    """Paged, ragged: each sequence against naive attention over its own contiguous keys; no NaN row is read."""
    from specattn_runtime.sparse.triton_attn import mask_to_indices

    dev = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32  # fp32 dots would run as tf32 on the GPU
    q, k_pool, v_pool, table, lens_t, mask, k_seqs, v_seqs = paged_case(gen, lens, h, hkv, tq, 32, page_size)
    sel = mask_to_indices(mask.to(dev)) if backend == "triton" else mask
    out = sparse_attention(q.to(dev, dtype), k_pool.to(dev, dtype), v_pool.to(dev, dtype), sel, chunk_size=16,
                           backend=backend, page_table=table.to(dev), kv_lens=lens_t.to(dev)).cpu()
    assert torch.isfinite(out).all(), "a key outside the sequences was read (or an output left unwritten)"
    for b in range(len(lens)):
        lo = lambda x: x.to(dtype).double()  # noqa: E731  the inputs the kernel saw
        ref = naive(lo(q[b : b + 1]), lo(k_seqs[b]), lo(v_seqs[b]), mask[b : b + 1, : -(-lens[b] // 16)], 16)
        err = (out[b : b + 1].double() - ref).norm() / ref.norm()
        assert err < (5e-3 if dtype == torch.float16 else 1e-5), f"sequence {b}: relative error {err:.2e}"


def test_paged_cache_bad_input(gen):
    q, k_pool, v_pool, table, lens_t, mask, _, _ = paged_case(gen, [40, 20], 2, 2, 1, 16, 16)
    from specattn_runtime.sparse.triton_attn import mask_to_indices

    sel = mask_to_indices(mask)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        sparse_attention(q, k_pool, v_pool, sel, chunk_size=32, backend="triton", page_table=table, kv_lens=lens_t)
    with pytest.raises(ValueError, match="kv_lens"):
        sparse_attention(q, k_pool, v_pool, sel, chunk_size=16, backend="triton", page_table=table)
    with pytest.raises(ValueError, match="int32"):
        sparse_attention(q, k_pool, v_pool, sel, chunk_size=16, backend="triton", page_table=table.long(),
                         kv_lens=lens_t)
    with pytest.raises(ValueError, match="contiguous cache"):
        sparse_attention(q, k_pool, v_pool, mask, chunk_size=16, backend="flashinfer", page_table=table,
                         kv_lens=lens_t)
