"""Attention over a preallocated cache with device-side lengths (the decode engine's form): the Triton kernel's
dense, sparse and recording modes against the torch reference, and the reference against naive float64 math.

Positions past each sequence's length hold NaN in the kernel's input: a kernel that reads one fails.
"""

import math

import pytest
import torch

from specattn_runtime.sparse import attention_with_lengths_reference
from specattn_runtime.sparse.triton_attn import mask_to_indices, sparse_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
TOL = {torch.float16: 5e-3, torch.float32: 1e-5}


def naive(q, k, v, lens, chunk_mask, chunk, last_only=False, per_head=False):
    """float64 softmax over exactly the visible, selected keys (``chunk_mask`` ``[B, C]`` or per KV head ``[B, Hkv,
    C]``); also the chunk mass summed over heads/queries (the last query only with ``last_only``), ``[B, C]``, or
    with ``per_head`` summed over each KV head's query heads, ``[B, Hkv, C]``."""
    b, h, tq, d = q.shape
    hkv, cap = k.shape[1], k.shape[2]
    rep = h // hkv
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    mass = torch.zeros(b, hkv if per_head else 1, -(-cap // chunk), dtype=torch.float64)
    for bi in range(b):
        sel = None if chunk_mask is None else (chunk_mask[bi] if chunk_mask.ndim == 3 else chunk_mask[bi][None])
        for hi in range(h):
            for t in range(tq):
                pos = int(lens[bi]) - tq + t
                keys = [j for j in range(pos + 1) if sel is None or sel[hi // rep % sel.shape[0], j // chunk]]
                s = q[bi, hi, t].double() @ k[bi, hi // rep, keys].double().T / math.sqrt(d)
                p = torch.softmax(s, -1)
                out[bi, hi, t] = p @ v[bi, hi // rep, keys].double()
                for j, pj in zip(keys, p):
                    if t == tq - 1 or not last_only:
                        mass[bi, hi // rep if per_head else 0, j // chunk] += pj
    return out, (mass if per_head else mass[:, 0])


def inputs(b, h, hkv, tq, cap, d, lens, gen, chunk=16, density=None):
    q = torch.randn(b, h, tq, d, generator=gen)
    k = torch.randn(b, hkv, cap, d, generator=gen)
    v = torch.randn(b, hkv, cap, d, generator=gen)
    for bi, n in enumerate(lens):  # what lies past the length is never part of the answer
        k[bi, :, n:] = 0.0
        v[bi, :, n:] = 0.0
    mask = None
    if density is not None:
        mask = torch.rand(b, -(-cap // chunk), generator=gen) < density
        mask[:, 0] = True
        for bi, n in enumerate(lens):
            mask[bi, (n - tq) // chunk :] = True  # the queries' own chunks
    return q, k, v, torch.tensor(lens, dtype=torch.int32), mask


CASES = [  # b, h, hkv, tq, cap, d, lens
    (1, 4, 4, 1, 150, 16, [37]),
    (1, 8, 2, 5, 200, 32, [200]),
    (2, 6, 3, 3, 130, 64, [17, 129]),
    (1, 9, 3, 1, 96, 64, [81]),
]


@pytest.mark.parametrize("b,h,hkv,tq,cap,d,lens", CASES)
@pytest.mark.parametrize("density", [None, 0.4])
def test_reference_matches_naive(b, h, hkv, tq, cap, d, lens, density, gen):
    q, k, v, kv_lens, mask = inputs(b, h, hkv, tq, cap, d, lens, gen, density=density)
    ref, ref_mass = naive(q, k, v, kv_lens, mask, 16)
    record = torch.rand(b, -(-cap // 16) + 3, generator=gen)  # accumulates into what is there
    before = record.clone()
    for rec in (None, record):
        out = attention_with_lengths_reference(q, k, v, kv_lens, mask, chunk_size=16, record=rec)
        err = (out.double() - ref).norm() / ref.norm()
        assert err < 1e-5, f"relative error {err:.2e}"
    added = (record - before)[:, : ref_mass.shape[1]].double()
    torch.testing.assert_close(added, ref_mass / h, rtol=1e-5, atol=1e-6)
    assert torch.equal(record[:, ref_mass.shape[1]:], before[:, ref_mass.shape[1]:])


@pytest.mark.parametrize("b,h,hkv,tq,cap,d,lens", CASES)
@pytest.mark.parametrize("density", [None, 0.4])
@pytest.mark.parametrize("record", [None, "all", "last"])
@pytest.mark.parametrize("splits", [None, 37])  # 37: more splits than chunks, and than one combine block
def test_triton_matches_reference_never_reading_past_the_length(b, h, hkv, tq, cap, d, lens, density, record,
                                                                 splits, gen):
    q, k, v, kv_lens, mask = inputs(b, h, hkv, tq, cap, d, lens, gen, density=density)
    start = torch.rand(b, -(-cap // 16), generator=gen)  # recording accumulates into what is there
    ref_rec = start.clone() if record else None
    last = record == "last"
    ref = attention_with_lengths_reference(q, k, v, kv_lens, mask, chunk_size=16, record=ref_rec,
                                           record_last_query=last)
    if last:  # the reference's last-query recording against naive float64
        _, mass = naive(q, k, v, kv_lens, mask, 16, last_only=True)
        torch.testing.assert_close((ref_rec - start)[:, : mass.shape[1]].double(), mass / h, rtol=1e-5, atol=1e-6)
    kp, vp = k.clone(), v.clone()
    for bi, n in enumerate(lens):  # poison: any read past the length turns the output NaN
        kp[bi, :, n:] = float("nan")
        vp[bi, :, n:] = float("nan")
    dev = lambda x: x.to(DEVICE, DTYPE)  # noqa: E731
    sel = mask_to_indices(mask.to(DEVICE)) if mask is not None else (None, None)
    out = torch.full_like(dev(q), float("nan"))
    rec = start.clone().to(DEVICE) if record else None
    sparse_attention_triton(dev(q), dev(kp), dev(vp), *sel, chunk_size=16, kv_lens=kv_lens.to(DEVICE), out=out,
                            record=rec, record_last_query=last, num_splits=splits)
    assert torch.isfinite(out).all(), "unwritten output, or a key past the length was read"
    err = (out.cpu().double() - ref.double()).norm() / ref.double().norm()
    assert err < TOL[DTYPE], f"relative error {err:.2e}"
    if record:
        assert torch.isfinite(rec).all()
        torch.testing.assert_close(rec.cpu(), ref_rec, rtol=4 * TOL[DTYPE], atol=TOL[DTYPE])


@pytest.mark.parametrize("b,h,hkv,tq,cap,d,lens", [CASES[1], CASES[2]])
@pytest.mark.parametrize("last", [False, True])
def test_per_kv_head_selection_and_recording(b, h, hkv, tq, cap, d, lens, last, gen):
    """One chunk set per KV head and one score row per KV head (its query heads averaged): the reference against
    naive float64, the kernel (read through head strides) against the reference."""
    q, k, v, kv_lens, _ = inputs(b, h, hkv, tq, cap, d, lens, gen)
    n_chunks = -(-cap // 16)
    mask = torch.rand(b, hkv, n_chunks, generator=gen) < 0.4
    mask[..., 0] = True
    for bi, n in enumerate(lens):
        mask[bi, :, (n - tq) // 16 :] = True  # the queries' own chunks
    start = torch.rand(b, hkv, n_chunks + 2, generator=gen)  # recording accumulates into what is there
    ref_rec = start.clone()
    ref = attention_with_lengths_reference(q, k, v, kv_lens, mask, chunk_size=16, record=ref_rec,
                                           record_last_query=last)
    want, mass = naive(q, k, v, kv_lens, mask, 16, last_only=last, per_head=True)
    assert (ref.double() - want).norm() / want.norm() < 1e-5
    torch.testing.assert_close((ref_rec - start)[..., :n_chunks].double(), mass / (h // hkv), rtol=1e-5, atol=1e-6)
    dev = lambda x: x.to(DEVICE, DTYPE)  # noqa: E731
    idx, count = mask_to_indices(mask.to(DEVICE))  # [B, Hkv, C], [B, Hkv]
    rec = start.clone().to(DEVICE)
    out = sparse_attention_triton(dev(q), dev(k), dev(v), idx, count, chunk_size=16, kv_lens=kv_lens.to(DEVICE),
                                  record=rec, record_last_query=last)
    err = (out.cpu().double() - ref.double()).norm() / ref.double().norm()
    assert err < TOL[DTYPE], f"relative error {err:.2e}"
    torch.testing.assert_close(rec.cpu(), ref_rec, rtol=4 * TOL[DTYPE], atol=TOL[DTYPE])


def test_selection_and_record_arguments_are_checked():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 40, 16)
    idx = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="both idx and count"):
        sparse_attention_triton(q, k, k, idx, None, chunk_size=16)
    with pytest.raises(ValueError, match="kv_lens must be int32"):
        sparse_attention_triton(q, k, k, None, None, chunk_size=16, kv_lens=torch.tensor([3]))
    with pytest.raises(ValueError, match="record must be float32"):
        sparse_attention_triton(q, k, k, None, None, chunk_size=16, record=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="record must be float32"):  # per KV head: one row per head
        sparse_attention_triton(q, k, k, None, None, chunk_size=16, record=torch.zeros(1, 3, 3))
