"""Preallocated KV caches of the models one runtime drives, at one capacity, and the prompt prefix they hold.

The decode engine's CUDA graphs bake in buffer addresses, so the caches outlive a ``generate`` call: a runtime
keeps one :class:`KVStore` per capacity bucket and recaptures only when it needs a larger one. Prefill goes through
transformers' own forward (its masks, its SDPA) with :class:`~specattn_runtime.cache.PreallocatedLayer` views of
these buffers; positions filled that way are exact, and a later prompt that starts with the same tokens reuses
them (``prefill`` computes only the new suffix). Positions written during decoding are never reused: a sparse
verification computes them approximately.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..cache import PreallocatedLayer

PREFILL_CHUNK = 4096  # tokens per prefill forward: bounds the [chunk, keys] mask transformers builds


def kv_shape(config) -> tuple[int, int, int]:
    """``(n_layers, kv_heads, head_dim)`` from a transformers config."""
    cfg = getattr(config, "text_config", None) or config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


class KVStore:
    """K/V buffers ``[1, Hkv, capacity, D]`` per layer for each model (``roles``: name -> model)."""

    def __init__(self, models: dict[str, torch.nn.Module], capacity: int):
        self.capacity = int(capacity)
        self.kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.prefix: dict[str, list[int]] = {}  # role -> token ids at positions [0, len) from dense prefill
        self.models = models
        for role, model in models.items():
            p = next(model.parameters())
            n, hkv, d = kv_shape(model.config)
            self.kv[role] = [(torch.zeros(1, hkv, self.capacity, d, dtype=p.dtype, device=p.device),
                              torch.zeros(1, hkv, self.capacity, d, dtype=p.dtype, device=p.device))
                             for _ in range(n)]
            self.prefix[role] = []

    @property
    def device(self) -> torch.device:
        return self.kv[next(iter(self.kv))][0][0].device

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for layers in self.kv.values() for k, _ in layers)

    @torch.no_grad()
    def prefill(self, role: str, ids: list[int], chunk: int = PREFILL_CHUNK) -> int:
        """Make positions ``[0, len(ids))`` of ``role``'s cache hold ``ids``; returns how many were reused."""
        if len(ids) > self.capacity:
            raise ValueError(f"{len(ids)} prompt tokens exceed the cache capacity {self.capacity}")
        old = self.prefix[role]
        keep = 0
        while keep < min(len(old), len(ids)) and old[keep] == ids[keep]:
            keep += 1
        self.prefix[role] = ids[:keep]  # a failure below leaves a consistent (shorter) prefix
        model = self.models[role]
        dev = self.device
        cache = Cache(layers=[PreallocatedLayer.over(k, v, keep) for k, v in self.kv[role]])
        for start in range(keep, len(ids), chunk):
            block = torch.tensor([ids[start : start + chunk]], dtype=torch.long, device=dev)
            model(block, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.prefix[role] = list(ids)
        return keep

    def invalidate_from(self, position: int) -> None:
        """Positions from ``position`` on are about to be overwritten: shorten the remembered prefixes."""
        for role, ids in self.prefix.items():
            self.prefix[role] = ids[: max(position, 0)]

    def forget(self, role: str | None = None) -> None:
        """Drop the remembered prefix (the buffers stay allocated)."""
        for r in [role] if role else list(self.prefix):
            self.prefix[r] = []
