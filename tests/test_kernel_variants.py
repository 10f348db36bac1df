"""Attention variants in the Triton kernel (sliding window, soft-capping, sinks), against the torch references, and
the references against the eager path's formulas (:func:`specattn_runtime.capture.softmax_attention`, which
tests/test_variants.py proves equal to transformers' own attention).

Every mode of the kernel takes the variants: dense with device-side lengths (the engine's decode attention), a
shared or per-KV-head chunk list (sparse verification, a selection intersected with the window), fused recording
(head-averaged or per KV head, every query or the last) and the paged pool. Sizes are ragged; windows start at a
chunk edge and inside a chunk. What the kernel must never read holds NaN in its input (past a sequence's length,
older than every query's window, unselected chunks, unused pool pages) and the output buffer starts as NaN: a
read of a poisoned key, or an output row left unwritten, fails the finite check before any error bound.
"""

import math
import os

import pytest
import torch

from specattn_runtime.capture import softmax_attention
from specattn_runtime.pooling import pool_to_chunks
from specattn_runtime.sparse import (attention_with_lengths_reference, key_mask_from_chunks, sparse_attention,
                                     sparse_attention_paged_reference, sparse_attention_reference)
from specattn_runtime.sparse.triton_attn import mask_to_indices, sparse_attention_triton
from specattn_runtime.variants import Variant, visible

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
# max error relative to the output's max; float64 inputs still take the softmax in float32 (as transformers does)
TOL = {torch.float16: 5e-3, torch.float32: 2e-5, torch.float64: 1e-6}
CHUNK = 16
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton kernels on CPU tensors need the interpreter (TRITON_INTERPRET=1)")


def close(got: torch.Tensor, want: torch.Tensor, what: str, dtype=DTYPE) -> None:
    """Finite (NaN never passes), then max |error| / max |reference| within the dtype's bound."""
    assert torch.isfinite(got).all(), f"{what}: {int((~torch.isfinite(got)).sum())} non-finite values"
    err = (got.double() - want.double()).abs()
    rel = (err.max() / want.double().abs().max().clamp_min(1e-30)).item()
    assert rel <= TOL[dtype], f"{what}: relative error {rel:.2e} (max {err.max().item():.2e}, mean {err.mean().item():.2e})"


def window_at(n: int, tq: int, where: str | None) -> int | None:
    """A window whose first query's oldest visible key (``n - tq - window + 1``) lies at a chunk edge (``"edge"``),
    7 keys into a chunk (``"inside"``), or covers only the key itself (``"one"``)."""
    if where is None:
        return None
    if where == "one":
        return 1
    p0 = max(n - tq, 0)
    lo = max(p0 // CHUNK - 1, 0) * CHUNK + (7 if where == "inside" else 0)
    return p0 - lo + 1


def inputs(b, h, hkv, tq, cap, d, gen, sink: bool):
    q = torch.randn(b, h, tq, d, generator=gen)
    k = torch.randn(b, hkv, cap, d, generator=gen)
    v = torch.randn(b, hkv, cap, d, generator=gen)
    sinks = torch.randn(h, generator=gen) * 2 if sink else None
    return q, k, v, sinks


def readable(lens, tq, cap, window, keys=None) -> torch.Tensor:
    """bool ``[B, 1 or Hkv, cap]``: positions a kernel may load (below the length, not older than the first query's
    window, in a selected chunk)."""
    pos = torch.arange(cap, device=keys.device if keys is not None else "cpu")
    rows = []
    for bi, n in enumerate(lens):
        ok = pos < n
        if window is not None:
            ok &= pos >= max(n - tq, 0) - window + 1
        rows.append(ok[None] if keys is None else ok[None] & keys[bi])
    return torch.stack(rows)


def poison(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, Hkv, cap, D]`` with NaN wherever ``ok`` ``[B, 1 or Hkv, cap]`` is False."""
    return x.masked_fill(~ok[..., None].expand_as(x), float("nan"))


def random_selection(b, hkv, cap, lens, tq, gen, per_head: bool) -> torch.Tensor:
    """bool ``[B, C]`` or ``[B, Hkv, C]``: random chunks, the sink chunk and the queries' own chunks always."""
    n_chunks = -(-cap // CHUNK)
    mask = torch.rand(b, hkv if per_head else 1, n_chunks, generator=gen) < 0.5
    mask[..., 0] = True
    for bi, n in enumerate(lens):
        mask[bi, :, max(n - tq, 0) // CHUNK :] = True
    return mask if per_head else mask[:, 0]


CASES = [  # b, h, hkv, tq, cap, d, lens: ragged lengths, GQA down to one KV head, head_dim up to 256
    (1, 4, 2, 1, 150, 16, [137]),
    (2, 6, 3, 3, 130, 32, [57, 129]),
    (1, 4, 1, 5, 100, 64, [100]),
    (1, 2, 1, 2, 70, 256, [69]),
]
VARIANTS = [pytest.param(*v, id=name) for name, v in {  # window position, softcap, sinks
    "window-edge": ("edge", None, False), "window-inside": ("inside", None, False), "window-1": ("one", None, False),
    "softcap": (None, 4.0, False), "sinks": (None, None, True), "all": ("inside", 3.0, True)}.items()]


# -- the references against the eager formulas ---------------------------------------------------------------------


@pytest.mark.parametrize("b,h,hkv,tq,cap,d,lens", CASES)
@pytest.mark.parametrize("where,softcap,sink", VARIANTS)
def test_references_equal_the_eager_formulas(b, h, hkv, tq, cap, d, lens, where, softcap, sink, gen):
    """float64: attention_with_lengths_reference (dense, per-KV-head selection, recording) and the paged reference
    equal the eager path's softmax attention over each sequence's visible, selected keys."""
    q, k, v, sinks = (x.double() if x is not None else None for x in inputs(b, h, hkv, tq, cap, d, gen, sink))
    window = window_at(lens[0], tq, where)
    variant = Variant(window, softcap, sinks)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    sel = random_selection(b, hkv, cap, lens, tq, gen, per_head=True)
    rec = torch.zeros(b, hkv, -(-cap // CHUNK), dtype=torch.float64)
    got = attention_with_lengths_reference(q, k, v, lens_t, sel, chunk_size=CHUNK, record=rec, window=window,
                                           softcap=softcap, sinks=sinks)
    dense = attention_with_lengths_reference(q, k, v, lens_t, chunk_size=CHUNK, window=window, softcap=softcap,
                                             sinks=sinks)
    for bi, n in enumerate(lens):
        kb, vb = k[bi : bi + 1, :, :n], v[bi : bi + 1, :, :n]
        keys = key_mask_from_chunks(sel[bi], n, CHUNK).repeat_interleave(h // hkv, 0)  # [H, n]
        mask = visible(tq, n, window)[None, None] & keys[None, :, None, :]  # [1, H, Tq, n]
        want, probs = softmax_attention(q[bi : bi + 1], kb, vb, mask, d ** -0.5, variant)
        close(got[bi : bi + 1], want.transpose(1, 2), f"selection, sequence {bi}", torch.float64)
        groups = probs.view(1, hkv, h // hkv, tq, n).mean(2).sum(2)  # [1, Hkv, n]: the group's mean, summed
        close(rec[bi : bi + 1, :, : -(-n // CHUNK)], pool_to_chunks(groups, CHUNK), f"record {bi}", torch.float64)
        if tq > n:  # the engine's clamp (queries before position 0 are position 0): not the eager formula's case
            continue
        want_dense = softmax_attention(q[bi : bi + 1], kb, vb, None, d ** -0.5, variant)[0]
        close(dense[bi : bi + 1], want_dense.transpose(1, 2), f"dense, sequence {bi}", torch.float64)
    if b == 1:  # the contiguous sparse reference (the eager loop's) is the same attention at full length
        shared = random_selection(b, hkv, cap, lens, tq, gen, per_head=False)
        a = sparse_attention_reference(q[:, :, :, :], k[:, :, : lens[0]], v[:, :, : lens[0]],
                                       shared[:, : -(-lens[0] // CHUNK)], CHUNK, None, variant)
        close(a, attention_with_lengths_reference(q, k, v, lens_t, shared, chunk_size=CHUNK, window=window,
                                                  softcap=softcap, sinks=sinks), "contiguous", torch.float64)


# -- the kernel against the references -------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("b,h,hkv,tq,cap,d,lens", CASES)
@pytest.mark.parametrize("where,softcap,sink", VARIANTS)
def test_kernel_with_lengths_equals_reference(b, h, hkv, tq, cap, d, lens, where, softcap, sink, gen):
    """Dense with recording (every query, head-averaged), a shared chunk list with per-KV-head recording of the
    last query, and a per-KV-head chunk list: each against the reference, never loading a poisoned key."""
    q, k, v, sinks = inputs(b, h, hkv, tq, cap, d, gen, sink)
    q, k, v = q.to(DEVICE, DTYPE), k.to(DEVICE, DTYPE), v.to(DEVICE, DTYPE)
    sinks = sinks.to(DEVICE) if sinks is not None else None
    window = window_at(lens[0], tq, where)
    var = dict(window=window, softcap=softcap, sinks=sinks)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    n_chunks = -(-cap // CHUNK)
    shared = random_selection(b, hkv, cap, lens, tq, gen, per_head=False)
    heads = random_selection(b, hkv, cap, lens, tq, gen, per_head=True)
    runs = [("dense", None, torch.rand(b, n_chunks + 3, generator=gen), False),
            ("shared", shared, torch.rand(b, hkv, n_chunks, generator=gen), True),
            ("per-head", heads, None, False)]
    for name, sel, base, last in runs:
        keys = None if sel is None else key_mask_from_chunks(sel if sel.ndim == 3 else sel[:, None], cap, CHUNK)
        ok = readable(lens, tq, cap, window, keys).to(DEVICE)
        rec = None if base is None else base.to(DEVICE)
        want_rec = None if base is None else base.clone().to(DEVICE)
        idx, count = (None, None) if sel is None else mask_to_indices(sel.to(DEVICE))
        out = torch.full_like(q, float("nan"))
        got = sparse_attention_triton(q, poison(k, ok), poison(v, ok), idx, count, chunk_size=CHUNK, kv_lens=lens_t,
                                      record=rec, record_last_query=last, out=out, **var)
        want = attention_with_lengths_reference(q.double(), k.double(), v.double(), lens_t,
                                                None if sel is None else sel.to(DEVICE), chunk_size=CHUNK,
                                                record=want_rec, record_last_query=last,
                                                **{**var, "sinks": None if sinks is None else sinks.double()})
        assert got is out
        close(got, want, name)
        if rec is not None:
            close(rec, want_rec, f"{name}: recorded mass")


@needs_triton
@pytest.mark.parametrize("where,softcap,sink", VARIANTS)
@pytest.mark.parametrize("tq", [1, 4])
def test_paged_kernel_equals_reference(where, softcap, sink, tq, gen):
    """The batched engine's form: ragged sequences in shuffled pages of a pool, dense (with recording) and sparse."""
    h, hkv, d, page, lens = 4, 2, 32, 32, [45, 96, 7 + tq]
    n_pages, max_pages = 12, 4
    q = torch.randn(len(lens), h, tq, d, generator=gen).to(DEVICE, DTYPE)
    k_pool = torch.randn(n_pages, page, hkv, d, generator=gen).to(DEVICE, DTYPE)
    v_pool = torch.randn(n_pages, page, hkv, d, generator=gen).to(DEVICE, DTYPE)
    sinks = (torch.randn(h, generator=gen) * 2).to(DEVICE) if sink else None
    table = torch.randperm(n_pages, generator=gen)[: len(lens) * max_pages].view(len(lens), max_pages)
    table = table.to(torch.int32).to(DEVICE)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    window = window_at(lens[1], tq, where)
    cap = max_pages * page
    sel = random_selection(len(lens), hkv, cap, lens, tq, gen, per_head=False).to(DEVICE)
    for name, mask in (("dense", None), ("sparse", sel)):
        keys = None if mask is None else key_mask_from_chunks(mask[:, None], cap, CHUNK)
        ok = readable(lens, tq, cap, window, keys).to(DEVICE)[:, 0]  # [B, cap] in sequence positions
        ok_pool = torch.zeros(n_pages * page, dtype=torch.bool, device=DEVICE)
        rows = (table.long()[:, :, None] * page + torch.arange(page, device=DEVICE)).flatten(1)  # [B, cap]
        ok_pool[rows[ok]] = True
        bad = ~ok_pool.view(n_pages, page)[:, :, None, None]
        kp, vp = k_pool.masked_fill(bad, float("nan")), v_pool.masked_fill(bad, float("nan"))
        rec = torch.rand(len(lens), cap // CHUNK, generator=gen).to(DEVICE)
        want_rec = rec.clone()
        idx, count = (None, None) if mask is None else mask_to_indices(mask)
        out = torch.full_like(q, float("nan"))
        got = sparse_attention_triton(q, kp, vp, idx, count, chunk_size=CHUNK, page_table=table, kv_lens=lens_t,
                                      record=rec, out=out, window=window, softcap=softcap, sinks=sinks)
        k_all = k_pool.view(-1, hkv, d)[rows].transpose(1, 2).double()  # [B, Hkv, cap, D]
        v_all = v_pool.view(-1, hkv, d)[rows].transpose(1, 2).double()
        want = attention_with_lengths_reference(q.double(), k_all, v_all, lens_t, mask, chunk_size=CHUNK,
                                                record=want_rec, window=window, softcap=softcap,
                                                sinks=None if sinks is None else sinks.double())
        close(got, want, f"paged {name}")
        close(rec, want_rec, f"paged {name}: recorded mass")
        full = mask if mask is not None else torch.ones_like(sel)
        ref = sparse_attention_paged_reference(q.double(), k_pool.double(), v_pool.double(), table, lens_t, full,
                                               CHUNK, None, Variant(window, softcap,
                                                                    None if sinks is None else sinks.double()))
        close(got, ref, f"paged {name} against the per-sequence reference")


@needs_triton
@pytest.mark.parametrize("where,softcap,sink", VARIANTS[1::2])
def test_eager_loop_verification_through_the_kernel(where, softcap, sink, gen):
    """The eager loop's sparse verification (``sparse_attention``, no lengths) with backend 'triton' equals 'torch'
    for the layer's variant; chunks selected outside the window change nothing."""
    b, h, hkv, tq, tk, d = 1, 4, 2, 4, 90, 32
    q, k, v, sinks = inputs(b, h, hkv, tq, tk, d, gen, sink)
    q, k, v = q.to(DEVICE, DTYPE), k.to(DEVICE, DTYPE), v.to(DEVICE, DTYPE)
    variant = Variant(window_at(tk, tq, where), softcap, sinks.to(DEVICE) if sinks is not None else None)
    sel = random_selection(b, hkv, tk, [tk], tq, gen, per_head=False).to(DEVICE)
    everything = torch.ones_like(sel)
    want = sparse_attention(q.double(), k.double(), v.double(), sel, chunk_size=CHUNK, variant=Variant(
        variant.window, softcap, None if sinks is None else variant.sinks.double()))
    for chunks in (sel, everything, mask_to_indices(sel)):
        got = sparse_attention(q, k, v, chunks, chunk_size=CHUNK, backend="triton", variant=variant)
        if chunks is everything:  # within the window every chunk is then read: compare with the dense eager formula
            want_all = softmax_attention(q.double(), k.double(), v.double(), None, d ** -0.5, Variant(
                variant.window, softcap, None if sinks is None else variant.sinks.double()))[0].transpose(1, 2)
            close(got, want_all, "every chunk")
        else:
            close(got, want, "selection")


@needs_triton
def test_window_past_the_context_is_the_plain_kernel_bit_for_bit(gen):
    """A window no query reaches changes nothing: the same chunks visited in the same order, the same bits."""
    q, k, v = (x.to(DEVICE, DTYPE) for x in inputs(1, 4, 2, 3, 120, 32, gen, False)[:3])
    lens = torch.tensor([101], dtype=torch.int32, device=DEVICE)
    sel = mask_to_indices(random_selection(1, 2, 120, [101], 3, gen, per_head=False).to(DEVICE))
    for idx, count in ((None, None), sel):
        rec_a, rec_b = torch.zeros(1, 8, device=DEVICE), torch.zeros(1, 8, device=DEVICE)
        a = sparse_attention_triton(q, k, v, idx, count, chunk_size=CHUNK, kv_lens=lens, record=rec_a)
        b = sparse_attention_triton(q, k, v, idx, count, chunk_size=CHUNK, kv_lens=lens, record=rec_b, window=500)
        assert torch.equal(a, b) and torch.equal(rec_a, rec_b)


@needs_triton
def test_sinks_mass_belongs_to_no_chunk(gen):
    """With sinks each query's recorded masses sum to 1 - p_sink (the share the sink took from its keys)."""
    q, k, v, sinks = inputs(1, 4, 4, 1, 64, 16, gen, True)
    lens = torch.tensor([64], dtype=torch.int32, device=DEVICE)
    rec = torch.zeros(1, 4, 4, device=DEVICE)
    sparse_attention_triton(*(x.to(DEVICE, DTYPE) for x in (q, k, v)), None, None, chunk_size=CHUNK, kv_lens=lens,
                            record=rec, record_weight=1.0, sinks=sinks.to(DEVICE))
    logits = torch.einsum("bhd,bhkd->bhk", q[:, :, 0].double(), k.double()) / 4.0  # [1, H, 64]
    p_sink = torch.softmax(torch.cat([logits, sinks.double().view(1, 4, 1)], -1), -1)[..., -1]
    close(rec.sum(-1), 1 - p_sink, "recorded mass per query head")


def test_variant_arguments_are_checked():
    q, k = torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 32, 16)
    lens = torch.tensor([32], dtype=torch.int32)
    for kw, msg in ((dict(window=0), "window must be a positive int"), (dict(softcap=0.0), "softcap must be > 0"),
                    (dict(sinks=torch.zeros(2)), r"sinks must be one logit per query head, \[H=4\]")):
        with pytest.raises(ValueError, match=msg):
            sparse_attention_triton(q, k, k, None, None, chunk_size=CHUNK, kv_lens=lens, **kw)
    with pytest.raises(ValueError, match="FlashInfer's block-sparse wrapper implements plain causal attention"):
        sparse_attention(q, k, k, torch.ones(1, 2, dtype=torch.bool), chunk_size=CHUNK, backend="flashinfer",
                         variant=Variant(window=8))


def test_window_helper_puts_the_boundary_where_it_says():
    for n, tq in ((137, 1), (100, 5), (57, 3)):
        for where, offset in (("edge", 0), ("inside", 7)):
            lo = max(n - tq, 0) - window_at(n, tq, where) + 1
            assert lo % CHUNK == offset and lo >= 0 and math.isfinite(lo)
