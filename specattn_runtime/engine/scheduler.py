"""Continuous batching, plain Python: waiting and running queues, admission by free pages and slots, finishing.

No tensors here (nano-vllm's ``scheduler.py`` shape), so it is tested without a model. A sequence is admitted when
a batch slot is free and the pool has the pages for its whole generation (reserved up front: a running sequence
never needs a page mid-step, so a step can never run out of memory or evict a neighbour). Running sequences fill
slots ``0 .. n - 1``; when one finishes, the last running sequence moves into its slot (the caller moves its device
state), so a step always runs on a prefix of the slots. Where the pool keeps rings for window layers, a sequence
also takes its fixed share of ring pages at admission (``ring_allocator``, ``ring_pages`` each).
"""

from __future__ import annotations

from collections import deque

from .pages import PageAllocator
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_batch: int, max_waiting: int | None = None,
                 ring_allocator: PageAllocator | None = None, ring_pages: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.allocator, self.max_batch, self.max_waiting = allocator, int(max_batch), max_waiting
        self.ring_allocator, self.ring_pages = ring_allocator, int(ring_pages) if ring_allocator else 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def pages_needed(self, seq: Sequence) -> int:
        return self.allocator.pages_for(seq.positions_needed)

    def check_fits(self, seq: Sequence) -> None:
        """A sequence whose generation needs more pages than the whole pool can never run: refuse it now."""
        need = self.pages_needed(seq)
        if need > self.allocator.capacity:
            raise ValueError(f"a prompt of {len(seq.prompt)} tokens + max_new_tokens={seq.max_new_tokens} + k="
                             f"{seq.k} + 1 needs {need} pages of {self.allocator.page_size} positions; the KV pool "
                             f"has {self.allocator.capacity}: raise kv_memory_gb, or shorten the prompt or the "
                             "generation")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise OverflowError(f"the waiting queue is full ({self.max_waiting} requests)")
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences (in arrival order) into free slots while their pages fit; returns them."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = self.pages_needed(seq)
            if need > self.allocator.n_free or (self.ring_pages and self.ring_pages > self.ring_allocator.n_free):
                break  # first come, first served: a later, smaller request does not overtake it
            self.waiting.popleft()
            seq.pages = self.allocator.allocate(need)
            seq.ring_pages = self.ring_allocator.allocate(self.ring_pages) if self.ring_pages else []
            seq.slot = len(self.running)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def finish(self, seq: Sequence) -> tuple[int, int] | None:
        """Return ``seq``'s pages and its slot. Returns ``(src, dst)`` when the last running sequence moved from
        slot ``src`` into the freed slot ``dst`` (the caller moves its device state), else ``None``."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
            return None
        if seq.status is not Status.RUNNING:
            return None
        self.allocator.free(seq.pages)
        if seq.ring_pages:
            self.ring_allocator.free(seq.ring_pages)
        seq.pages, seq.ring_pages, seq.status = [], [], Status.FINISHED
        dst, last = seq.slot, self.running.pop()
        seq.slot = -1
        if last is seq:
            return None
        self.running[dst] = last
        src, last.slot = last.slot, dst
        return src, dst

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
