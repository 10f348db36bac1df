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


def test_index_and_mask_selections_agree(gen):
    """Both selection forms reach every backend: a kernel's (idx, count) and a bool mask give the same output."""
    from specattn_runtime.sparse.triton_attn import mask_to_indices

    q, k, v = (torch.randn(1, 4, 3, 16, generator=gen), torch.randn(1, 2, 70, 16, generator=gen),
               torch.randn(1, 2, 70, 16, generator=gen))
    mask = torch.tensor([[True, False, True, False, True]])
    by_mask = sparse_attention(q, k, v, mask, chunk_size=16)
    by_idx = sparse_attention(q, k, v, mask_to_indices(mask), chunk_size=16)
    torch.testing.assert_close(by_idx, by_mask, rtol=0, atol=0)
