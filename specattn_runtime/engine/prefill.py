"""Chunked prefill of one sequence into the paged pool, through transformers' own forward (its masks, its SDPA).

A prompt goes in pieces of ``chunk_tokens`` tokens, so a 128K prompt never materialises full-length logits
(``logits_to_keep=1``) or a ``[T, T]`` mask. Each piece's keys and values are written into the sequence's pages;
its attention reads the sequence's positions so far gathered into a contiguous copy (prefill is compute-bound and
runs once per prompt: the copy is not what it costs). A window layer with a ring (``pages.py``) goes through
:class:`~specattn_runtime.engine.ring.PagedRingLayer` instead: the retained window and the new keys, the newest ring
slots written. Positions filled this way are exact, as in :meth:`KVStore.prefill`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..variants import layer_windows
from .pages import PagedKVPool
from .ring import PagedRingLayer

PREFILL_TOKENS = 4096  # tokens per prefill forward: bounds the [piece, keys] mask transformers builds


class _PagedPrefillLayer(DynamicLayer):
    """One layer's cache during a prefill: writes go to the pool pages, reads see the positions so far.

    ``rows`` is shared by every layer of the forward: ``(new, all)`` flat pool rows of the piece's positions and of
    every position up to its end (the same for each layer, so computed once per piece)."""

    def __init__(self, pool: PagedKVPool, role: str, layer: int, rows: dict, capacity: int):
        super().__init__()
        self.pool, self.role, self.layer, self.rows, self.capacity = pool, role, layer, rows, capacity
        self.length = 0
        self.is_initialized = True
        self.keys = self.values = None

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool is allocated already
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        k_pool, v_pool = self.pool.kv[self.role][self.layer]
        flat = (-1, *k_pool.shape[2:])
        new, everything = self.rows["new"], self.rows["all"]
        # key_states [1, Hkv, T, D] -> [T, Hkv, D] rows of the pool
        k_pool.view(flat).index_copy_(0, new, key_states[0].transpose(0, 1).to(k_pool.dtype))
        v_pool.view(flat).index_copy_(0, new, value_states[0].transpose(0, 1).to(v_pool.dtype))
        self.length += key_states.shape[-2]
        self.keys = k_pool.view(flat).index_select(0, everything).transpose(0, 1)[None]
        self.values = v_pool.view(flat).index_select(0, everything).transpose(0, 1)[None]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity


@torch.no_grad()
def prefill_into_pool(pool: PagedKVPool, role: str, pages: list[int], ids: list[int],
                      chunk_tokens: int = PREFILL_TOKENS, ring_pages: list[int] = ()) -> None:
    """Fill positions ``[0, len(ids))`` of the sequence owning ``pages`` (and ``ring_pages``, when the pool has
    rings) with ``ids``, ``chunk_tokens`` at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"prefill chunk must be >= 1 token, got {chunk_tokens}")
    if len(ids) > len(pages) * pool.page_size:
        raise ValueError(f"{len(ids)} tokens do not fit {len(pages)} pages of {pool.page_size}")
    if pool.ring_slots and len(ring_pages) != pool.ring_pages:
        raise ValueError(f"the pool's window layers need {pool.ring_pages} ring pages, got {len(ring_pages)}")
    model = pool.models[role]
    capacity = len(pages) * pool.page_size
    rows: dict = {}
    ring_rows = pool.slots(list(ring_pages), 0, pool.ring_slots) if pool.ring_slots else None
    windows = layer_windows(model.config)
    layers = [PagedRingLayer(*pool.kv[role][j], ring_rows, windows[j], 0, capacity) if r else
              _PagedPrefillLayer(pool, role, j, rows, capacity) for j, r in enumerate(pool.ring[role])]
    cache = Cache(layers=layers)
    everything = pool.slots(pages, 0, len(ids))
    for start in range(0, len(ids), chunk_tokens):
        stop = min(start + chunk_tokens, len(ids))
        rows["new"], rows["all"] = everything[start:stop], everything[:stop]
        block = torch.tensor([ids[start:stop]], dtype=torch.long, device=pool.device)
        model(block, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for layer in layers:  # the gathered copies are only needed during the piece's forward
            layer.keys = layer.values = None
