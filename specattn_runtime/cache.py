"""A KV cache allocated once per generation: appends write in place, rollback is a length change.

transformers' ``DynamicCache`` appends with ``torch.cat``, which copies the whole cache on every forward: at 32K
tokens of a 7B model that is ~16 GB of copying per verification, as much traffic as dense attention itself and
pure overhead for sparse attention. :class:`PreallocatedLayer` keeps ``[batch, kv_heads, capacity, head_dim]``
buffers and hands attention views of the filled prefix (strided along the sequence, contiguous in ``head_dim``,
which every backend here accepts). Speculative rollback (``crop``) only moves the length; the next write
overwrites the rejected positions.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's K/V in fixed buffers of ``capacity`` positions (allocated on the first update)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor, length: int = 0) -> "PreallocatedLayer":
        """A layer writing into existing buffers ``[B, Hkv, capacity, D]`` whose first ``length`` positions are
        already filled (the decode engine's caches, prefilled through transformers' forward)."""
        layer = cls(keys.shape[2])
        layer.dtype, layer.device = keys.dtype, keys.device
        layer._k, layer._v, layer.length = keys, values, int(length)
        layer._views()
        layer.is_initialized = True
        return layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._k = torch.empty(b, h, self.capacity, d, dtype=key_states.dtype, device=key_states.device)
        self._v = torch.empty(b, h, self.capacity, value_states.shape[-1], dtype=value_states.dtype,
                              device=value_states.device)
        self.length = 0
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded ({end} positions); allocate a larger cache")
        self._k[:, :, self.length : end].copy_(key_states)
        self._v[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many newest positions; positive (legacy form): keep that many."""
        if not self.is_initialized:
            return
        keep = self.length + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, self.length)
        self.length = max(keep, 0)
        self._views()

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._views()


def preallocated_cache(n_layers: int, capacity: int) -> Cache:
    """A ``Cache`` of ``n_layers`` :class:`PreallocatedLayer` of ``capacity`` positions each."""
    if capacity < 1:
        raise ValueError(f"cache capacity must be >= 1, got {capacity}")
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(n_layers)])
