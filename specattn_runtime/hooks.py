"""The runtime's attention function, plugged into both models through transformers' ``AttentionInterface``.

Models are loaded with ``attn_implementation="specattn"``. With no ``specattn_state`` keyword in the forward
call (prefill, plain decoding) it is transformers' SDPA attention. During speculation the loop passes a
:class:`StepState`:

- draft forwards (``mode="draft"``): layers in ``record_layers`` compute softmax attention explicitly and append
  their head-averaged (``per_kv_head``: per KV head), chunk-pooled row for the new query to ``rows[layer]``;
  layers in ``chunk_masks`` (sparse drafting) read only those chunks, and record the mass of what they read;
- the target's verification forward (``mode="verify"``): layers with a chunk selection in ``chunk_masks`` call
  the block-sparse attention backend; the others (dense layers) stay on SDPA. Self-speculation (mode ``self``)
  drafts in this mode: its selections, made at an earlier length, are one per KV head and every key past their
  end is read;
- dense forwards that record (``mode="record"``: self-speculation's verification and prefill): layers in
  ``record_layers`` add, per KV head, the chunk-pooled attention of the forward's last ``record_queries`` queries
  (summed over those queries, averaged over the group's query heads) to ``rows[layer]``.

Inside the decode engine (keyword ``specattn_engine=True``, no transformers cache) every layer goes to the
engine's attention op instead, which owns the cache writes (``engine/forward.py``), with the layer's variant.

Every branch follows the layer's variant (:mod:`specattn_runtime.variants`): sliding windows (also in sparse
verification: keys outside the window are never read), soft-capping and attention sinks, with the torch or Triton
backend; FlashInfer refuses those models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture import register_attention, softmax_attention
from .pooling import pool_to_chunks
from .sparse import key_mask_from_chunks, sparse_attention
from .variants import variant_of, visible

ATTN_NAME = "specattn"


@dataclass
class StepState:
    mode: str  # "draft" | "verify" | "record"
    chunk_size: int
    record_layers: frozenset[int] = frozenset()
    # "draft": draft layer -> [B, C_s] per draft step; "record": layer -> [B, Hkv, C] (one tensor)
    rows: dict[int, list[torch.Tensor] | torch.Tensor] = field(default_factory=dict)
    # target layer -> bool mask [B, C] or [B, Hkv, C] (shorter masks: later chunks are all read), or the selection
    # kernel's compacted (idx [B, C], count [B])
    chunk_masks: dict[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    backend: str = "torch"
    record_queries: int = 1
    per_kv_head: bool = False  # "draft": rows per KV head [B, Hkv, C] instead of head-averaged [B, C]


def _specattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        specattn_state: StepState | None = None, specattn_engine: bool = False, **kwargs):
    st, layer = specattn_state, getattr(module, "layer_idx", None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    variant = variant_of(kwargs)
    if specattn_engine:  # the layer's variant goes to the op as plain numbers (0: none) and its sink parameter
        from .engine.forward import engine_attention

        return engine_attention(query, key, value, layer, float(scale), variant.window or 0,
                                variant.softcap or 0.0, variant.sinks), None
    if st is not None and st.mode == "draft" and layer in st.chunk_masks and layer not in st.record_layers:
        return _sparse(st, layer, query, key, value, scale, variant)
    if st is not None and st.mode == "draft" and layer in st.record_layers:
        mask = attention_mask
        if layer in st.chunk_masks:  # sparse drafting on a guiding layer: it records the mass of what it reads
            mask = _with_chunks(attention_mask, st.chunk_masks[layer], query, key, st.chunk_size, variant)
        out, probs = softmax_attention(query, key, value, mask, scale, variant)
        last = probs[:, :, -1].float()  # the newest query: [B, H, Tk]
        if st.per_kv_head:  # each KV head's group of query heads averaged: [B, Hkv, C]
            b, h, tk = last.shape
            row = pool_to_chunks(last.view(b, key.shape[1], h // key.shape[1], tk).mean(2), st.chunk_size)
        else:  # head-averaged: [B, C]
            row = pool_to_chunks(last.mean(1), st.chunk_size)
        st.rows.setdefault(layer, []).append(row)
        return out, None
    if st is not None and st.mode == "verify" and layer in st.chunk_masks:
        return _sparse(st, layer, query, key, value, scale, variant)
    if st is not None and st.mode == "record" and layer in st.record_layers:
        return _record_per_kv_head(st, layer, module, query, key, value, attention_mask, scale, variant,
                                   scaling=scaling, dropout=dropout, **kwargs)
    return dense_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _sparse(st: StepState, layer: int, query, key, value, scale, variant):
    """Block-sparse attention over the layer's chunk selection (a shorter mask reads every later chunk)."""
    sel = st.chunk_masks[layer]
    if not isinstance(sel, tuple):
        sel = _extend(sel, -(-key.shape[2] // st.chunk_size))
    out = sparse_attention(query, key, value, sel, chunk_size=st.chunk_size, scale=scale, backend=st.backend,
                           variant=variant)
    return out.transpose(1, 2).contiguous(), None


def _with_chunks(attention_mask, chunks: torch.Tensor, query, key, chunk_size: int, variant) -> torch.Tensor:
    """bool ``[B, H, Tq, Tk]``: the keys the layer's own mask (or causality within its window) lets each query see,
    restricted to the selected chunks (``chunks`` bool ``[B, C]`` or ``[B, Hkv, C]``)."""
    b, h, tq, _ = query.shape
    tk = key.shape[2]
    keys = key_mask_from_chunks(_extend(chunks, -(-tk // chunk_size)), tk, chunk_size)  # [B, (Hkv,) Tk]
    keys = keys[:, None] if keys.ndim == 2 else keys.repeat_interleave(h // keys.shape[1], dim=1)
    if attention_mask is None:
        base = visible(tq, tk, variant.window, query.device)
    elif attention_mask.dtype == torch.bool:
        base = attention_mask[..., :tk]
    else:  # additive: 0 where visible
        base = attention_mask[..., :tk] == 0
    return base & keys[:, :, None, :]


def dense_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention, or the explicit softmax where the layer soft-caps or has sinks (SDPA has
    neither): the layer's own attention, exactly. Returns ``(out [B, Tq, H, D], None)``."""
    variant = variant_of(kwargs)
    if variant.softcap is not None or variant.sinks is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return softmax_attention(query, key, value, attention_mask, scale, variant)[0], None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _extend(mask: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """A selection made over fewer chunks, extended to ``n_chunks``: the chunks past its end hold keys written
    since it was made, and are all read."""
    short = n_chunks - mask.shape[-1]
    if short <= 0:
        return mask[..., :n_chunks]
    return torch.cat([mask, mask.new_ones(*mask.shape[:-1], short)], dim=-1)


def _record_per_kv_head(st: StepState, layer: int, module, query, key, value, attention_mask, scale, variant,
                        **kwargs):
    """Dense attention, plus the per-KV-head chunk-pooled mass of the last ``st.record_queries`` queries."""
    m = min(st.record_queries, query.shape[2])
    if m == query.shape[2]:  # a verification block: the recording pass is the attention itself
        out, probs = softmax_attention(query, key, value, attention_mask, scale, variant)
    else:  # a prefill: SDPA for every query, explicit probabilities for the last m only (never [H, T, T])
        out = dense_attention(module, query, key, value, attention_mask, **kwargs)[0]
        mask = attention_mask[..., -m:, :] if attention_mask is not None else None
        probs = softmax_attention(query[:, :, -m:], key, value, mask, scale, variant)[1]
    b, h, _, tk = probs.shape
    hkv = key.shape[1]
    groups = probs.float().view(b, hkv, h // hkv, m, tk).mean(2).sum(2)  # [B, Hkv, Tk]
    st.rows[layer] = pool_to_chunks(groups, st.chunk_size)
    return out, None


def register() -> str:
    """Register ``"specattn"`` (with SDPA's mask builder) with transformers; idempotent."""
    return register_attention(ATTN_NAME, _specattn_attention, mask="sdpa")
