"""A paged KV pool shared by the models one runtime drives, and the allocator that hands its pages out.

Many sequences of different lengths share one pool of fixed-size pages (vLLM's PagedAttention layout): a sequence
owns a list of pages (its page table), and position ``t`` of it lives at row ``t % page_size`` of page
``pages[t // page_size]``. Every model (draft and target) has its own K/V tensors over the *same* page ids, so one
allocator and one page table per sequence serve both.

Pool tensors are ``[n_pages, page_size, Hkv, D]`` per layer, the form the Triton kernel reads through a page
table. Page 0 is never handed out: padded batch slots point their whole page table at it, so their (ignored)
writes land there and never in a live sequence's pages.

The allocator is plain Python (no tensors), so the scheduler and its tests need no device.
"""

from __future__ import annotations

import torch

from .kv import kv_shape

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


def bytes_per_page(models: dict[str, torch.nn.Module], page_size: int) -> int:
    """K and V bytes of one page over every layer of every model."""
    total = 0
    for model in models.values():
        n, hkv, d = kv_shape(model.config)
        total += 2 * n * page_size * hkv * d * next(model.parameters()).element_size()
    return total


def pages_in_budget(models: dict[str, torch.nn.Module], page_size: int, kv_memory_gb: float) -> int:
    """How many pages ``kv_memory_gb`` (GiB) of K/V holds."""
    return int(kv_memory_gb * 2**30 // bytes_per_page(models, page_size))


class PagedKVPool:
    """K/V page pools ``[n_pages, page_size, Hkv, D]`` per layer for each model (``models``: role -> model)."""

    def __init__(self, models: dict[str, torch.nn.Module], n_pages: int, page_size: int):
        self.models, self.page_size = models, int(page_size)
        self.allocator = PageAllocator(n_pages, page_size)
        self.kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for role, model in models.items():
            p = next(model.parameters())
            n, hkv, d = kv_shape(model.config)
            shape = (n_pages, self.page_size, hkv, d)
            self.kv[role] = [(torch.zeros(shape, dtype=p.dtype, device=p.device),
                              torch.zeros(shape, dtype=p.dtype, device=p.device)) for _ in range(n)]

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
