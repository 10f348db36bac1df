"""Window-sized caches for sliding-window layers: a ring of ``R`` slots, position ``p`` at slot ``p % R``.

A layer with window ``W`` never reads a key older than ``position - W + 1`` (the kernels and the reference enforce
it), so keeping every position wastes memory: Gemma-3-12B at 128K holds 40 local layers of window 1024 beside its
8 global ones. The ring size rule (:func:`ring_slots`):

- one forward writes ``T`` tokens at ``P .. P + T - 1``; its first query still reads keys from ``P - W + 1``, and the
  last write overwrites position ``P + T - 1 - R``: ``R >= W + T - 1`` keeps every key a query of the forward sees;
- a speculative step may then roll back: the verification wrote ``L .. L + k`` and the next forward starts at
  ``L + n + 1`` (or rewrites ``L + n``, the draft-model engine's first draft forward) with ``n >= 0`` accepted;
  it reads back to ``L + n - W + 1`` while the rejected writes destroyed up to ``L + k - R``: ``R >= W + k``, i.e.
  ``W + T - 1`` with ``T = k + 1`` again. Rollback stays a length update;
- ``T`` is bounded by :data:`MAX_FORWARD_TOKENS` for every engine over the store (the store is shared by engines of
  different ``k``), so ``R = W + MAX_FORWARD_TOKENS`` (one slot of margin), rounded up to a multiple of the chunk
  size so a logical chunk is a run of contiguous slots (coalesced loads; correctness needs no alignment: the kernel
  addresses each key), and never more than the capacity (a short context keeps a plain cache: no ring).

:class:`RingLayer` is the ring as a transformers cache layer, for prefill through transformers' own forward: it
behaves like transformers' ``DynamicSlidingWindowLayer`` (``update`` returns the retained last ``W - 1`` keys in
position order followed by the new ones; ``get_mask_sizes`` reports that length and its offset, so transformers
builds the matching sliding mask) and writes the new keys into the ring. :class:`PagedRingLayer` is the same over
a sequence's ring pages in the batched engine's pool (``pages.py``).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

MAX_FORWARD_TOKENS = 64  # the most tokens one engine forward over a ring store writes (k + 1 <= this)


def ring_slots(window: int | None, capacity: int, max_forward_tokens: int = MAX_FORWARD_TOKENS,
               align: int = 16) -> int:
    """Slots of a window layer's ring (see the module docstring), or 0: no ring (a full layer, or a ring that would
    not be smaller than the capacity)."""
    if not window:
        return 0
    slots = -(-(window + max_forward_tokens) // align) * align
    return slots if slots < capacity else 0


class RingLayer(DynamicLayer):
    """A sliding-window layer's ring ``[1, Hkv, R, D]`` as a transformers cache layer holding ``length`` positions.

    Parameters
    ----------
    keys, values : torch.Tensor
        The ring buffers (written in place).
    window : int
        The layer's sliding window ``W`` (``R >= W - 1`` slots needed: the retained keys).
    length : int
        Positions already in the ring (a reused prompt prefix); its last ``min(length, W - 1)`` must be intact.
    capacity : int
        The most positions the store holds (the cache's maximum length).
    """

    is_sliding = True  # transformers then takes this layer's mask sizes for the sliding-window mask

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, window: int, length: int, capacity: int):
        super().__init__()
        self.window, self.length, self.capacity = int(window), int(length), int(capacity)
        self._k, self._v = keys, values
        self.slots = keys.shape[2]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.keys = self.values = None  # never read: update returns the states attention needs

    def lazy_initialization(self, key_states, value_states) -> None:  # the ring is allocated already
        pass

    def _read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[1, Hkv, n, D]`` at ring slots ``slots`` int64 ``[n]``."""
        return self._k.index_select(2, slots), self._v.index_select(2, slots)

    def _write(self, slots: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store ``key_states`` / ``value_states`` ``[1, Hkv, n, D]`` at ring slots ``slots`` int64 ``[n]``."""
        self._k.index_copy_(2, slots, key_states.to(self.dtype))
        self._v.index_copy_(2, slots, value_states.to(self.dtype))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Retained keys + ``key_states`` ``[1, Hkv, T, D]`` in position order; the new ones go into the ring."""
        t = key_states.shape[-2]
        if self.length + t > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded ({self.length + t} positions)")
        n = min(self.length, self.window - 1)  # the retained keys: the last W - 1 positions, oldest first
        old_k, old_v = self._read(torch.arange(self.length - n, self.length, device=self.device) % self.slots)
        full_k = torch.cat([old_k, key_states.to(self.dtype)], dim=-2)
        full_v = torch.cat([old_v, value_states.to(self.dtype)], dim=-2)
        m = min(t, self.slots)  # only the newest R survive; writing more would hit one slot twice (order undefined)
        new = torch.arange(self.length + t - m, self.length + t, device=self.device) % self.slots
        self._write(new, key_states[:, :, t - m :], value_states[:, :, t - m :])
        self.length += t
        return full_k, full_v

    def get_mask_sizes(self, query, *args, **kwargs) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the keys the next ``update`` returns, as ``DynamicSlidingWindowLayer``
        reports them. ``query`` is the query length (transformers 5.2x) or the cache positions (older 5.x)."""
        q = query if isinstance(query, int) else int(query.shape[0])
        return min(self.length, self.window - 1) + q, max(self.length - self.window + 1, 0)

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a prefill ring layer is written once in order; the engine rolls back by length")


class PagedRingLayer(RingLayer):
    """A sequence's ring in a paged pool ``[n_pages, page_size, Hkv, D]``: ring slot ``s`` is pool row ``rows[s]``
    (``rows`` int64 ``[R]``: the sequence's ring pages, in order). Otherwise :class:`RingLayer`."""

    def __init__(self, k_pool: torch.Tensor, v_pool: torch.Tensor, rows: torch.Tensor, window: int, length: int,
                 capacity: int):
        flat = (-1, *k_pool.shape[2:])  # [n_pages * page_size, Hkv, D]
        super().__init__(k_pool.view(flat), v_pool.view(flat), window, length, capacity)
        self.rows, self.slots = rows, int(rows.shape[0])

    def _read(self, slots):
        rows = self.rows[slots]
        return self._k[rows].transpose(0, 1)[None], self._v[rows].transpose(0, 1)[None]

    def _write(self, slots, key_states, value_states):
        rows = self.rows[slots]
        self._k.index_copy_(0, rows, key_states[0].transpose(0, 1).to(self.dtype))
        self._v.index_copy_(0, rows, value_states[0].transpose(0, 1).to(self.dtype))
