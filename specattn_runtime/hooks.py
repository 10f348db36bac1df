"""The runtime's attention function, plugged into both models through transformers' ``AttentionInterface``.

Models are loaded with ``attn_implementation="specattn"``. With no ``specattn_state`` keyword in the forward
call (prefill, plain decoding) it is transformers' SDPA attention. During speculation the loop passes a
:class:`StepState`:

- draft forwards (``mode="draft"``): layers in ``record_layers`` compute softmax attention explicitly and append
  their head-averaged, chunk-pooled row for the new query to ``rows[layer]``;
- the target's verification forward (``mode="verify"``): layers with a chunk selection in ``chunk_masks`` call
  the block-sparse attention backend; the others (dense layers) stay on SDPA.

Inside the decode engine (keyword ``specattn_engine=True``, no transformers cache) every layer goes to the
engine's attention op instead, which owns the cache writes (``engine/forward.py``).

Every branch outside the engine follows the layer's variant (:mod:`specattn_runtime.variants`): sliding windows
(also in sparse verification: keys outside the window are never read), soft-capping and attention sinks, with the
torch backend; the runtime refuses those models for the engine and the GPU backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture import register_attention, softmax_attention
from .pooling import pool_to_chunks
from .sparse import sparse_attention
from .variants import variant_of

ATTN_NAME = "specattn"


@dataclass
class StepState:
    mode: str  # "draft" | "verify"
    chunk_size: int
    record_layers: frozenset[int] = frozenset()
    rows: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # draft layer -> [B, C_s] per draft step
    # target layer -> bool mask [B, C], or the selection kernel's compacted (idx [B, C], count [B])
    chunk_masks: dict[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    backend: str = "torch"


def _specattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        specattn_state: StepState | None = None, specattn_engine: bool = False, **kwargs):
    st, layer = specattn_state, getattr(module, "layer_idx", None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    variant = variant_of(kwargs)
    if specattn_engine:
        if not variant.plain:  # models are checked when a runtime is built; this catches the rest
            raise ValueError(f"{type(module).__name__} passes a sliding window, soft-capping or attention sinks to "
                             "its attention, which the decode engine does not implement yet (engine='eager' with "
                             "backend='torch' does)")
        from .engine.forward import engine_attention

        return engine_attention(query, key, value, layer, float(scale)), None
    if st is not None and st.mode == "draft" and layer in st.record_layers:
        out, probs = softmax_attention(query, key, value, attention_mask, scale, variant)
        row = pool_to_chunks(probs[:, :, -1].float().mean(1), st.chunk_size)  # newest query, head-averaged: [B, C]
        st.rows.setdefault(layer, []).append(row)
        return out, None
    if st is not None and st.mode == "verify" and layer in st.chunk_masks:
        out = sparse_attention(query, key, value, st.chunk_masks[layer], chunk_size=st.chunk_size, scale=scale,
                               backend=st.backend, variant=variant)
        return out.transpose(1, 2).contiguous(), None
    if variant.softcap is not None or variant.sinks is not None:  # transformers' SDPA path would drop them
        return softmax_attention(query, key, value, attention_mask, scale, variant)[0], None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def register() -> str:
    """Register ``"specattn"`` (with SDPA's mask builder) with transformers; idempotent."""
    return register_attention(ATTN_NAME, _specattn_attention, mask="sdpa")
