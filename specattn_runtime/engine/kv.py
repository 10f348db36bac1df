"""Preallocated KV caches of the models one runtime drives, at one capacity, and the prompt prefix they hold.

The decode engine's CUDA graphs bake in buffer addresses, so the caches outlive a ``generate`` call: a runtime
keeps one :class:`KVStore` per capacity bucket and recaptures only when it needs a larger one. Prefill goes through
transformers' own forward (its masks, its SDPA) with :class:`~specattn_runtime.cache.PreallocatedLayer` views of
these buffers; positions filled that way are exact, and a later prompt that starts with the same tokens reuses
them (``prefill`` computes only the new suffix). Positions written during decoding are never reused: a sparse
verification computes them approximately.

Sliding-window layers get a ring of ``R`` slots instead of ``capacity`` positions (:mod:`.ring`: position ``p`` at
slot ``p % R``; ``R`` = the window + the most tokens one engine forward writes, rounded up to the chunk size).
Decoding overwrites a ring's older positions, including the prompt's last ``W - 1`` that a reused prefix needs, so
each prefill ends by copying the rings into a snapshot (another ``R`` slots per ring layer: what keeps prefix reuse
working after a generation longer than ``R - W``, e.g. a chat turn whose next prompt extends this one). A later
prefill reuses ``keep`` positions only if every ring layer's snapshot still holds the ``W - 1`` positions before
``keep`` (it holds a contiguous run ending at the last prefilled position; a prompt that diverges more than about
``R - W`` positions before that end is recomputed from position 0: a ring cannot be rebuilt from the middle, as
each window layer's keys depend on the window before them); it then restores the rings from the snapshot.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..cache import PreallocatedLayer
from ..variants import layer_windows
from .ring import MAX_FORWARD_TOKENS, RingLayer, ring_slots

PREFILL_CHUNK = 4096  # tokens per prefill forward: bounds the [chunk, keys] mask transformers builds


def kv_shape(config) -> tuple[int, int, int]:
    """``(n_layers, kv_heads, head_dim)`` from a transformers config."""
    cfg = getattr(config, "text_config", None) or config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


class KVStore:
    """K/V buffers per layer for each model (``roles``: name -> model): ``[1, Hkv, capacity, D]``, or ``[1, Hkv, R,
    D]`` rings for sliding-window layers (``ring[role][layer]`` = ``R``, 0 = a full-length buffer).

    ``rings=False`` gives every layer a full-length buffer (the layout before rings, for comparisons); with rings,
    engines over the store write at most ``max_forward_tokens`` tokens per forward (``k + 1``: checked by them).
    """

    def __init__(self, models: dict[str, torch.nn.Module], capacity: int, *, rings: bool = True,
                 max_forward_tokens: int = MAX_FORWARD_TOKENS):
        self.capacity = int(capacity)
        self.max_forward_tokens = int(max_forward_tokens)
        self.kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.ring: dict[str, list[int]] = {}  # role -> per layer: ring slots, 0 = full length
        self.windows: dict[str, list[int | None]] = {}
        self.prefix: dict[str, list[int]] = {}  # role -> token ids at positions [0, len) from dense prefill
        self._snapshot: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # role -> ring layer -> copy
        self._held_from: dict[str, dict[int, int]] = {}  # role -> ring layer -> first position of its snapshot run
        self.models = models
        for role, model in models.items():
            p = next(model.parameters())
            n, hkv, d = kv_shape(model.config)
            self.windows[role] = layer_windows(model.config)
            self.ring[role] = [ring_slots(w, self.capacity, self.max_forward_tokens) if rings else 0
                               for w in self.windows[role]]
            self.kv[role] = [(torch.zeros(1, hkv, r or self.capacity, d, dtype=p.dtype, device=p.device),
                              torch.zeros(1, hkv, r or self.capacity, d, dtype=p.dtype, device=p.device))
                             for r in self.ring[role]]
            self._snapshot[role] = {j: (torch.zeros_like(k), torch.zeros_like(v))
                                    for j, (k, v) in enumerate(self.kv[role]) if self.ring[role][j]}
            self._held_from[role] = {j: 0 for j in self._snapshot[role]}
            self.prefix[role] = []

    @property
    def device(self) -> torch.device:
        return self.kv[next(iter(self.kv))][0][0].device

    @property
    def has_rings(self) -> bool:
        return any(any(r) for r in self.ring.values())

    def nbytes(self) -> int:
        """Bytes allocated: every layer's K and V, and the rings' snapshots."""
        bufs = [t for layers in self.kv.values() for kv in layers for t in kv]
        bufs += [t for snaps in self._snapshot.values() for kv in snaps.values() for t in kv]
        return sum(t.numel() * t.element_size() for t in bufs)

    def nbytes_full(self) -> int:
        """Bytes a full-length buffer for every layer would take (``capacity`` positions, no rings, no snapshots)."""
        return sum(2 * k.shape[1] * self.capacity * k.shape[3] * k.element_size()
                   for layers in self.kv.values() for k, _ in layers)

    @torch.no_grad()
    def prefill(self, role: str, ids: list[int], chunk: int = PREFILL_CHUNK) -> int:
        """Make positions ``[0, len(ids))`` of ``role``'s cache hold ``ids``; returns how many were reused."""
        if len(ids) > self.capacity:
            raise ValueError(f"{len(ids)} prompt tokens exceed the cache capacity {self.capacity}")
        old = self.prefix[role]
        keep = 0
        while keep < min(len(old), len(ids)) and old[keep] == ids[keep]:
            keep += 1
        keep = self._reusable(role, keep)
        self.prefix[role] = ids[:keep]  # a failure below leaves a consistent (shorter) prefix
        self._restore_rings(role, keep)
        model = self.models[role]
        dev = self.device
        cache = Cache(layers=[self._prefill_layer(role, j, keep) for j in range(len(self.kv[role]))])
        for start in range(keep, len(ids), chunk):
            block = torch.tensor([ids[start : start + chunk]], dtype=torch.long, device=dev)
            model(block, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self._snapshot_rings(role, keep, len(ids))
        self.prefix[role] = list(ids)
        return keep

    def _prefill_layer(self, role: str, j: int, keep: int):
        k, v = self.kv[role][j]
        if self.ring[role][j]:
            return RingLayer(k, v, self.windows[role][j], keep, self.capacity)
        return PreallocatedLayer.over(k, v, keep)

    def _reusable(self, role: str, keep: int) -> int:
        """``keep``, or 0 when some ring layer's snapshot lacks one of the ``W - 1`` positions before it."""
        for j, first in self._held_from[role].items():
            if max(keep - self.windows[role][j] + 1, 0) < first:
                return 0
        return keep

    def _restore_rings(self, role: str, keep: int) -> None:
        """Put the snapshot back into the rings (decoding overwrote their prompt positions) before reusing them."""
        if not keep:
            return
        for j, (sk, sv) in self._snapshot[role].items():
            k, v = self.kv[role][j]
            k.copy_(sk)
            v.copy_(sv)

    def _snapshot_rings(self, role: str, keep: int, n: int) -> None:
        """Copy the rings after a prefill of positions ``[keep, n)``: each now holds the run ``[first, n)``, where
        restored positions below ``keep`` survive unless the prefill overwrote them (``p >= n - R``)."""
        for j, (sk, sv) in self._snapshot[role].items():
            k, v = self.kv[role][j]
            sk.copy_(k)
            sv.copy_(v)
            first = max(n - self.ring[role][j], 0)
            self._held_from[role][j] = max(first, self._held_from[role][j]) if keep else first

    def invalidate_from(self, position: int) -> None:
        """Positions from ``position`` on are about to be overwritten: shorten the remembered prefixes. (A ring's
        writes there also overwrite older positions; a reuse restores the ring from its snapshot, untouched.)"""
        for role, ids in self.prefix.items():
            self.prefix[role] = ids[: max(position, 0)]

    def forget(self, role: str | None = None) -> None:
        """Drop the remembered prefix (the buffers stay allocated)."""
        for r in [role] if role else list(self.prefix):
            self.prefix[r] = []
