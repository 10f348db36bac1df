"""Recording chunk-pooled attention from inside a Hugging Face model, through transformers' ``AttentionInterface``.

No modeling code is copied: we register one attention function under the name ``"specattn_record"`` and load
models with ``attn_implementation="specattn_record"``. It computes ordinary softmax attention (the same math as
transformers' eager path) and, when the forward call passes a :class:`AttentionRecorder` as the keyword argument
``specattn_recorder``, stores for each layer the head-averaged attention of the chosen query rows pooled to chunks.
It follows each layer's variant (sliding window, soft-capping, sinks, scaling: :mod:`specattn_runtime.variants`),
so with nothing skipped the model's logits are transformers' own. Only those pooled rows are kept
(``[batch, queries, n_chunks]`` per layer), never ``[layers, heads, T, T]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .pooling import pool_to_chunks
from .variants import PLAIN, Variant, softcapped, softmax_with_sinks, variant_of, visible

ATTN_NAME = "specattn_record"
_registered: set[str] = set()


@dataclass
class AttentionRecorder:
    """Collects pooled attention rows during one forward pass.

    Parameters
    ----------
    query_positions : torch.Tensor
        int64 ``[queries]``: absolute positions (within the forward's query block) whose rows are kept.
    chunk_size : int
        Keys per chunk.
    layers : set[int] or None
        Layer indices to record; ``None`` records every layer.
    per_kv_head : bool
        Also keep one row per KV head (its group of query heads averaged) in ``rows_kv``.
    """

    query_positions: torch.Tensor
    chunk_size: int
    layers: set[int] | None = None
    per_kv_head: bool = False
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [batch, queries, n_chunks]
    rows_kv: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [batch, Hkv, queries, C]

    def wants(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers

    def record(self, layer_idx: int, probs: torch.Tensor, n_kv_heads: int | None = None) -> None:
        """Keep the head-averaged, chunk-pooled rows of ``probs`` ``[B, H, Tq, Tk]`` at ``query_positions`` (and,
        with ``per_kv_head``, the rows of each of the ``n_kv_heads`` groups of consecutive query heads)."""
        rows = probs[:, :, self.query_positions, :].float()  # [B, H, Q, Tk]
        self.rows[layer_idx] = pool_to_chunks(rows.mean(dim=1), self.chunk_size)
        if self.per_kv_head:
            b, h, q, tk = rows.shape
            groups = rows.view(b, n_kv_heads, h // n_kv_heads, q, tk).mean(dim=2)
            self.rows_kv[layer_idx] = pool_to_chunks(groups, self.chunk_size)

    def stacked(self, n_layers: int) -> torch.Tensor:
        """float32 ``[n_layers, batch, queries, n_chunks]``; raises if a layer was not recorded."""
        missing = [i for i in range(n_layers) if i not in self.rows]
        if missing:
            raise RuntimeError(f"no attention recorded for layers {missing}: was the model loaded with "
                               f"attn_implementation={ATTN_NAME!r}?")
        return torch.stack([self.rows[i] for i in range(n_layers)])


def softmax_attention(query, key, value, attention_mask, scale, variant: Variant = PLAIN):
    """Plain softmax attention that also returns the probabilities (transformers' eager math, every variant).

    query ``[B, H, Tq, D]``; key/value ``[B, Hkv, Tk, D]``; attention_mask ``[B, 1 or H, Tq, Tk]``, additive (float,
    transformers' eager masks) or boolean (True = attend: its SDPA masks), or None (then causal with the queries at
    the last ``Tq`` positions, within ``variant.window``). A mask from transformers already holds the layer's
    window. ``variant`` adds logit soft-capping and attention sinks. Returns ``([B, Tq, H, D], [B, H, Tq, Tk])``.
    """
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    # GQA without repeating K/V: the query heads of one KV group are consecutive (head i reads KV head i // rep),
    # so fold them into the query axis. Repeating would copy the whole cache of every recorded layer per step.
    qg = query.reshape(b, hkv, (h // hkv) * tq, d)
    logits = softcapped(torch.matmul(qg, key.transpose(2, 3)).view(b, h, tq, tk) * scale, variant.softcap)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask[..., :tk], float("-inf"))
    elif attention_mask is not None:
        logits = logits + attention_mask[..., :tk]
    elif tq > 1 or variant.window is not None:
        logits = logits.masked_fill(~visible(tq, tk, variant.window, query.device), float("-inf"))
    probs = softmax_with_sinks(logits, variant.sinks).to(query.dtype)
    out = torch.matmul(probs.view(b, hkv, (h // hkv) * tq, tk), value).view(b, h, tq, value.shape[-1])
    return out.transpose(1, 2).contiguous(), probs


def _record_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      specattn_recorder: AttentionRecorder | None = None, **kwargs):
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, probs = softmax_attention(query, key, value, attention_mask, scale, variant_of(kwargs))
    rec = specattn_recorder
    layer_idx = getattr(module, "layer_idx", None)
    if rec is not None and layer_idx is not None and rec.wants(layer_idx):
        rec.record(layer_idx, probs, key.shape[1])
    return out, None


def register_attention(name: str, fn, mask: str) -> str:
    """Register ``fn`` under ``name`` with transformers' ``AttentionInterface``, with the mask builder of the
    built-in implementation ``mask`` (``"eager"``: additive float mask; ``"sdpa"``: boolean or None). Idempotent."""
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(name, fn)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask])
        _registered.add(name)
    return name


def register() -> str:
    """Register the recording attention (always with an additive causal mask) with transformers."""
    return register_attention(ATTN_NAME, _record_attention, mask="eager")
