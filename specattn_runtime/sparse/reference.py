"""Block-sparse attention, plain torch: a boolean key mask built from the chunk selection, then SDPA.

Exact for the selected set: every selected key is read in full precision and nothing else is. The reference for
the GPU kernels and the CPU backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..variants import PLAIN, Variant, softcapped, softmax_with_sinks, visible


def key_mask_from_chunks(chunk_mask: torch.Tensor, n_keys: int, chunk_size: int) -> torch.Tensor:
    """bool ``[..., C]`` chunk selection -> bool ``[..., n_keys]`` key selection."""
    return chunk_mask.repeat_interleave(chunk_size, dim=-1)[..., :n_keys]


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_mask: torch.Tensor,
                               chunk_size: int, scale: float | None = None, variant: Variant = PLAIN) -> torch.Tensor:
    """Causal attention of the newest ``Tq`` positions over the selected key chunks.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, Tq, D]`` queries at absolute positions ``Tk - Tq .. Tk - 1``.
    k, v : torch.Tensor
        ``[B, Hkv, Tk, D]`` with ``H % Hkv == 0`` (GQA: each KV head serves ``H // Hkv`` query heads).
    chunk_mask : torch.Tensor
        bool ``[B, ceil(Tk / chunk_size)]``: chunks every query of the sequence may read (shared by all heads and
        queries, which is what lets a kernel load each selected block once), or ``[B, Hkv, ceil(Tk / chunk_size)]``:
        one selection per KV head, read by the query heads of its group.
    variant : Variant
        The layer's sliding window (keys outside it are never read, whatever is selected), logit soft-capping and
        attention sinks (:mod:`specattn_runtime.variants`).

    Returns
    -------
    torch.Tensor
        ``[B, H, Tq, D]``.
    """
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    if not chunk_mask[..., (tk - tq) // chunk_size :].all():
        raise ValueError("the chunks holding the queries' own positions (the newest chunks) must be selected")
    if chunk_mask.ndim == 3:  # per KV head: a group's query heads are consecutive (head i reads KV head i // rep)
        keys = key_mask_from_chunks(chunk_mask, tk, chunk_size).repeat_interleave(h // k.shape[1], dim=1)
        keys = keys[:, :, None, :]  # [B, H, 1, Tk]
    else:
        keys = key_mask_from_chunks(chunk_mask, tk, chunk_size)[:, None, None, :]  # [B, 1, 1, Tk]
    mask = keys & visible(tq, tk, variant.window, q.device)[None, None]  # [B, 1 or H, Tq, Tk]
    if variant.softcap is not None or variant.sinks is not None:  # SDPA has neither
        from ..capture import softmax_attention

        return softmax_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale,
                                 variant)[0].transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != k.shape[1])


def gather_pages(pool: torch.Tensor, pages: torch.Tensor, n_keys: int) -> torch.Tensor:
    """One sequence of a paged cache as a contiguous layer: pool ``[n_pages, page_size, Hkv, D]``, its pages
    int ``[max_pages]`` -> ``[1, Hkv, n_keys, D]``."""
    page_size = pool.shape[1]
    used = pages[: -(-n_keys // page_size)].long()
    return pool[used].flatten(0, 1)[:n_keys].transpose(0, 1)[None]


def sparse_attention_paged_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                     page_table: torch.Tensor, kv_lens: torch.Tensor, chunk_mask: torch.Tensor,
                                     chunk_size: int, scale: float | None = None,
                                     variant: Variant = PLAIN) -> torch.Tensor:
    """:func:`sparse_attention_reference` over a paged cache with ragged sequences (one sequence at a time).

    ``k_pool`` / ``v_pool`` ``[n_pages, page_size, Hkv, D]``, ``page_table`` int ``[B, max_pages]``, ``kv_lens``
    int ``[B]``; ``chunk_mask`` bool ``[B, C]`` with ``C`` covering the longest sequence; ``variant`` as there.
    """
    outs = []
    for b, n in enumerate(kv_lens.tolist()):
        k = gather_pages(k_pool, page_table[b], n)
        v = gather_pages(v_pool, page_table[b], n)
        outs.append(sparse_attention_reference(q[b : b + 1], k, v, chunk_mask[b : b + 1, : -(-n // chunk_size)],
                                               chunk_size, scale, variant))
    return torch.cat(outs)


def attention_with_lengths_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor,
                                     chunk_mask: torch.Tensor | None = None, *, chunk_size: int,
                                     scale: float | None = None, record: torch.Tensor | None = None,
                                     record_weight: float | None = None,
                                     record_last_query: bool = False, window: int | None = None,
                                     softcap: float | None = None, sinks: torch.Tensor | None = None,
                                     ring: int = 0) -> torch.Tensor:
    """Causal attention over a preallocated cache whose valid length lives in a tensor (the decode engine's form).

    Static shapes, no host read of the lengths: what the engine's torch backend runs, and the reference for the
    Triton kernel's ``kv_lens`` / dense / ``record`` modes.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, Tq, D]``, the queries at positions ``kv_lens[b] - Tq .. kv_lens[b] - 1``.
    k, v : torch.Tensor
        ``[B, Hkv, cap, D]``; positions ``>= kv_lens[b]`` are never read (whatever they hold).
    kv_lens : torch.Tensor
        int ``[B]``.
    chunk_mask : torch.Tensor, optional
        bool ``[B, >= ceil(cap / chunk_size)]``: the selected chunks, or ``[B, Hkv, >= ceil(cap / chunk_size)]``:
        one selection per KV head, read by its group's query heads; ``None`` = dense.
    record : torch.Tensor, optional
        float32 ``[B, >= ceil(cap / chunk_size)]``: ``record_weight`` (default ``1 / H``) times the attention mass
        of each chunk, summed over heads and queries (the last query only with ``record_last_query``), is added;
        float32 ``[B, Hkv, >= ceil(cap / chunk_size)]``: per KV head, summed over its group's query heads (default
        weight ``Hkv / H``: the group's mean). The mass is the probability the output used; with ``sinks`` the
        sink's own share goes to no chunk.
    window, softcap, sinks
        The layer's variant (:mod:`specattn_runtime.variants`): keys at or before ``position - window`` are not
        visible (a selection is intersected with the window); ``softcap * tanh(logit / softcap)``; one logit per
        query head, float ``[H]``, joining the softmax denominator only.
    ring : int
        0: slot ``s`` of ``k`` / ``v`` holds position ``s``. Otherwise the cache is a ring of ``ring = cap`` slots
        (a sliding-window layer's, :mod:`specattn_runtime.engine.ring`): position ``p`` lives at slot ``p % ring``,
        so slot ``s`` holds the newest position below ``kv_lens[b]`` congruent to it. Positions, masks, chunk
        selections (``chunk_mask`` and ``record`` then span the logical chunks, ``>= ceil(kv_lens / chunk_size)``)
        stay logical; only where a key is read from changes. Needs ``window`` with ``ring >= window + Tq - 1``.
    """
    b, h, tq, d = q.shape
    hkv, cap = k.shape[1], k.shape[2]
    scale = scale if scale is not None else d ** -0.5
    if ring:
        _check_ring(ring, cap, window, tq)
    key_pos = slot_positions(kv_lens.to(q.device), cap, ring)  # [1 or B, cap]: the position each slot holds
    q_pos = (kv_lens.to(q.device).long()[:, None] - tq + torch.arange(tq, device=q.device)).clamp_min(0)  # [B, Tq]
    allowed = (key_pos[:, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, Tq, cap]: causal, hence < kv_lens
    if ring:  # slots not yet written at this length hold no position
        allowed = allowed & (key_pos >= 0)[:, None, None, :]
    if window is not None:
        allowed = allowed & (key_pos[:, None, :] > q_pos[:, :, None] - window)[:, None]
    if chunk_mask is not None:
        if ring:
            keys = _slot_chunk_mask(chunk_mask, key_pos, chunk_size)
        else:
            n_chunks = -(-cap // chunk_size)
            keys = key_mask_from_chunks(chunk_mask[..., :n_chunks], cap, chunk_size)  # [B, cap] or [B, Hkv, cap]
        # per KV head: a group's query heads are consecutive (head i reads KV head i // (H / Hkv))
        keys = keys.repeat_interleave(h // hkv, dim=1) if keys.ndim == 3 else keys[:, None]  # [B, 1 or H, cap]
        allowed = allowed & keys[:, :, None, :]  # [B, 1 or H, Tq, cap]
    if record is None and softcap is None and sinks is None:  # SDPA has neither soft-capping nor sinks
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=h != hkv)
    qg = q.reshape(b, hkv, (h // hkv) * tq, d)  # GQA: a KV group's query heads are consecutive
    logits = softcapped(torch.matmul(qg, k.transpose(2, 3)).view(b, h, tq, cap) * scale, softcap)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = softmax_with_sinks(logits, sinks)
    if record is None:
        return torch.matmul(probs.to(q.dtype).view(b, hkv, (h // hkv) * tq, cap), v).view(b, h, tq, v.shape[-1])
    out = torch.matmul(probs.to(q.dtype).view(b, hkv, (h // hkv) * tq, cap), v).view(b, h, tq, v.shape[-1])
    outputs = hkv if record.ndim == 3 else 1  # score rows: one per KV head, or one for all heads
    mass = (probs[:, :, -1:] if record_last_query else probs).reshape(b, outputs, -1, cap)
    weight = (outputs / h) if record_weight is None else float(record_weight)
    if ring:  # each slot's mass goes to its position's logical chunk
        chunk = (key_pos.clamp_min(0) // chunk_size).expand(b, cap)[:, None].expand(b, outputs, cap)
        pooled = torch.zeros(b, outputs, record.shape[-1], dtype=mass.dtype, device=mass.device)
        pooled.scatter_add_(-1, chunk, mass.sum(2))  # [B, outputs, C]
        record += weight * (pooled if record.ndim == 3 else pooled[:, 0])
        return out
    pad = -cap % chunk_size
    if pad:
        mass = F.pad(mass, (0, pad))
    pooled = mass.view(b, outputs, mass.shape[2], -1, chunk_size).sum(-1).sum(2)  # [B, outputs, C]
    record[..., : pooled.shape[-1]] += weight * (pooled if record.ndim == 3 else pooled[:, 0])
    return out


def slot_positions(kv_lens: torch.Tensor, slots: int, ring: int = 0) -> torch.Tensor:
    """int64 ``[1, slots]`` (``ring`` 0: slot ``s`` holds position ``s``) or ``[B, slots]``: the newest position
    below ``kv_lens[b]`` that lives in slot ``s`` of a ring of ``ring`` slots (negative: none yet)."""
    s = torch.arange(slots, device=kv_lens.device)
    if not ring:
        return s[None]
    last = kv_lens.long()[:, None] - 1  # [B, 1]
    return last - torch.remainder(last - s, ring)


def _slot_chunk_mask(chunk_mask: torch.Tensor, key_pos: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """bool ``[B, slots]`` or ``[B, Hkv, slots]``: whether each slot's position lies in a selected logical chunk
    (``chunk_mask`` ``[B, C]`` or ``[B, Hkv, C]``; slots holding no position read chunk 0, masked elsewhere)."""
    chunk = (key_pos.clamp_min(0) // chunk_size).expand(chunk_mask.shape[0], -1)  # [B, slots]
    if chunk_mask.ndim == 3:
        chunk = chunk[:, None].expand(-1, chunk_mask.shape[1], -1)
    return torch.gather(chunk_mask, -1, chunk)


def _check_ring(ring: int, slots: int, window: int | None, tq: int) -> None:
    """A ring holds a window layer's last ``ring`` positions: every key the ``tq`` queries can see must fit."""
    if ring != slots:
        raise ValueError(f"ring={ring} must be the cache's slot count ({slots}): position p lives at slot p % ring")
    if window is None or ring < window + tq - 1:
        raise ValueError(f"a ring cache of {ring} slots needs a window with ring >= window + Tq - 1 (window "
                         f"{window}, Tq {tq}): the queries' oldest visible key would be overwritten")
