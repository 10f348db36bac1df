"""A paged KV pool shared by the models one runtime drives, and the allocator that hands its pages out.

Many sequences of different lengths share one pool of fixed-size pages (vLLM's PagedAttention layout): a sequence
owns a list of pages (its page table), and position ``t`` of it lives at row ``t % page_size`` of page
``pages[t // page_size]``. Every model (draft and target) has its own K/V tensors over the *same* page ids, so one
allocator and one page table per sequence serve both.

Pool tensors are ``[n_pages, page_size, Hkv, D]`` per layer, the form the Triton kernel reads through a page
table. Page 0 is never handed out: padded batch slots point their whole page table at it, so their (ignored)
writes land there and never in a live sequence's pages.

Sliding-window layers (``ring_sequences > 0``) do not keep every position: each running sequence owns a fixed set
of ``R / page_size`` *ring pages* (``ring.py``: position ``p`` at ring slot ``p % R``, ``R`` = the longest window
of either model + the most tokens one forward writes, rounded up to the page), from a second, small page space
with its own allocator: window layers' pools are ``[1 + ring_sequences * R / page_size, page_size, Hkv, D]``, so
Gemma 3 (five window layers of 1,024 per full one) holds a long sequence in ~1/6 of the full layout's memory.
Both models' window layers use the same ring page ids, as their full layers share the main page ids.

The allocator is plain Python (no tensors), so the scheduler and its tests need no device.
"""

from __future__ import annotations

import torch

from ..variants import layer_windows
from .kv import kv_shape
from .ring import MAX_FORWARD_TOKENS, ring_slots

SCRATCH_PAGE = 0  # the page padded slots read and write


class PagesExhausted(ValueError):
    """Raised when a request needs more pages than the pool has free (nothing is allocated then)."""


class PageAllocator:
    """A free list over pages ``1 .. n_pages - 1`` (page 0 is the scratch page)."""

    def __init__(self, n_pages: int, page_size: int):
        if n_pages < 2:
            raise ValueError(f"a paged pool needs at least 2 pages (one is scratch), got {n_pages}")
        self.n_pages, self.page_size = int(n_pages), int(page_size)
        self._free = list(range(self.n_pages - 1, 0, -1))  # pop() hands out low page ids first

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages a sequence can ever get (every page but the scratch page)."""
        return self.n_pages - 1

    def pages_for(self, n_positions: int) -> int:
        return -(-int(n_positions) // self.page_size)

    def allocate(self, n: int) -> list[int]:
        """``n`` free pages, or :class:`PagesExhausted` (and nothing taken) when fewer are free."""
        if n > len(self._free):
            raise PagesExhausted(f"{n} pages needed, {len(self._free)} free of {self.capacity}")
        taken = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        return taken

    def free(self, pages: list[int]) -> None:
        """Return ``pages`` to the pool; a page freed twice or never allocated is a bug and raises."""
        back = set(pages)
        if len(back) != len(pages) or SCRATCH_PAGE in back or back & set(self._free) or \
                max(back, default=1) >= self.n_pages:
            raise RuntimeError(f"freeing pages that are not allocated: {sorted(pages)[:8]}...")
        self._free.extend(sorted(back, reverse=True))


def pool_ring_slots(models: dict[str, torch.nn.Module], page_size: int,
                    max_forward_tokens: int = MAX_FORWARD_TOKENS) -> int:
    """``R``, the ring slots every window layer of a pool over ``models`` gets (a multiple of ``page_size``), or 0
    when no layer has a window that a ring would hold in fewer positions than the model's context."""
    slots = 0
    for model in models.values():
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        limit = getattr(cfg, "max_position_embeddings", None) or 2**62
        for w in set(filter(None, layer_windows(model.config))):
            slots = max(slots, ring_slots(w, limit, max_forward_tokens, align=page_size))
    return slots


def _ring_layers(model: torch.nn.Module, ring: int) -> list[bool]:
    """Per layer: whether it keeps a ring of ``ring`` slots: a window layer whose window that many slots hold (a
    window longer than the rings, possible only where the model's context is shorter still, stays paged)."""
    return [bool(ring and w and w + MAX_FORWARD_TOKENS <= ring) for w in layer_windows(model.config)]


def _bytes_per_position(models: dict[str, torch.nn.Module], ring: int, in_rings: bool) -> int:
    """K and V bytes of one position over the layers of every model that keep rings (``in_rings``) or pages."""
    total = 0
    for model in models.values():
        n, hkv, d = kv_shape(model.config)
        rings = sum(_ring_layers(model, ring))
        total += 2 * (rings if in_rings else n - rings) * hkv * d * next(model.parameters()).element_size()
    return total


def bytes_per_page(models: dict[str, torch.nn.Module], page_size: int, ring: int = 0) -> int:
    """K and V bytes of one page over every paged (full-length) layer of every model: all layers when ``ring`` is
    0, the layers without a window otherwise."""
    return page_size * _bytes_per_position(models, ring, in_rings=False)


def ring_pool_bytes(models: dict[str, torch.nn.Module], ring: int, sequences: int, page_size: int) -> int:
    """K and V bytes of the ring pools for ``sequences`` sequences (``ring`` slots in every window layer of every
    model, and the scratch page)."""
    if not ring:
        return 0
    return (sequences * ring // page_size + 1) * page_size * _bytes_per_position(models, ring, in_rings=True)


class PagedKVPool:
    """K/V page pools ``[n_pages, page_size, Hkv, D]`` per layer for each model (``models``: role -> model).

    ``ring_sequences``: how many sequences may hold rings at once (window layers then get ring pools, see the
    module docstring; 0 keeps every position of every layer in pages, the layout before rings).
    """

    def __init__(self, models: dict[str, torch.nn.Module], n_pages: int, page_size: int, ring_sequences: int = 0):
        self.models, self.page_size = models, int(page_size)
        self.allocator = PageAllocator(n_pages, page_size)
        self.ring_slots = pool_ring_slots(models, self.page_size) if ring_sequences > 0 else 0
        self.ring_sequences = int(ring_sequences) if self.ring_slots else 0
        self.ring_pages = self.ring_slots // self.page_size  # per sequence
        self.ring_allocator = PageAllocator(self.ring_sequences * self.ring_pages + 1, page_size) \
            if self.ring_slots else None
        self.kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.ring: dict[str, list[int]] = {}  # role -> per layer: ring slots, 0 = paged over every position
        for role, model in models.items():
            p = next(model.parameters())
            n, hkv, d = kv_shape(model.config)
            self.ring[role] = [self.ring_slots if r else 0 for r in _ring_layers(model, self.ring_slots)]
            shapes = [((self.ring_allocator.n_pages if r else n_pages), self.page_size, hkv, d)
                      for r in self.ring[role]]
            self.kv[role] = [(torch.zeros(shape, dtype=p.dtype, device=p.device),
                              torch.zeros(shape, dtype=p.dtype, device=p.device)) for shape in shapes]

    @property
    def device(self) -> torch.device:
        return self.kv[next(iter(self.kv))][0][0].device

    @property
    def n_pages(self) -> int:
        return self.allocator.n_pages

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for layers in self.kv.values() for k, _ in layers)

    def slots(self, pages: list[int], start: int, stop: int) -> torch.Tensor:
        """int64 ``[stop - start]``: flat row (``page * page_size + offset``) of positions ``start .. stop - 1``."""
        pos = torch.arange(start, stop)
        table = torch.tensor(pages, dtype=torch.int64)
        return (table[pos // self.page_size] * self.page_size + pos % self.page_size).to(self.device)
