"""The batched engine loop: admit (prefill into the pool, load a slot), step every running sequence, finish.

:class:`BatchRunner` joins the parts: a :class:`Scheduler` (queues, pages), a :class:`BatchEngine` (device state and
phases) and :class:`BatchGraphs` (one graph per bucket). A new sequence is prefilled in chunks and joins the running
batch at a step boundary; a finished one (EOS, ``max_new_tokens``, or :meth:`cancel`) returns its pages at once.
``SpecAttnRuntime.generate_batch`` drives it to completion; a server drives it one :meth:`step` at a time.
"""

from __future__ import annotations

import time

import torch

from ..stats import GenerationOutput, kv_read_sums
from .batch import BatchEngine, bucket_for
from .graphs import BatchGraphs
from .pages import PagedKVPool
from .prefill import PREFILL_TOKENS, prefill_into_pool
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .step import SparsePlan


class BatchRunner:
    """Continuous batching of sequences sharing one ``k`` and sampling mode over one :class:`PagedKVPool`.

    ``n_layers``: the target's layer count (per-layer statistics); ``prefill_tokens``: tokens per prefill forward.
    """

    def __init__(self, target, pool: PagedKVPool, plan: SparsePlan, k: int, forwards: dict, *, max_batch: int,
                 max_pages: int, mode: str = "draft", sampling: str = "greedy", backend: str = "torch",
                 graphs: bool = True, prefill_tokens: int = PREFILL_TOKENS, engine_class=BatchEngine):
        self.pool, self.plan, self.k, self.mode = pool, plan, k, mode
        self.engine = engine_class(target, pool, plan, k, forwards, max_batch=max_batch, max_pages=max_pages,
                                   mode=mode, sampling=sampling, backend=backend)
        self.graphs = BatchGraphs(self.engine, graphs)
        self.scheduler = Scheduler(pool.allocator, max_batch, ring_allocator=pool.ring_allocator,
                                   ring_pages=pool.ring_pages)
        self.prefill_tokens = prefill_tokens
        self.n_layers = target.config.num_hidden_layers
        self.n_draft_layers = len(pool.kv["draft"]) if "draft" in pool.kv else 0
        self.roles = ("target", "draft") if k and mode == "draft" else ("target",)
        self.step_seconds = 0.0  # device time of the decode steps (all sequences together)
        self.prefill_seconds = 0.0  # time of the prefills (a server's idle share counts both as busy)
        self.steps = 0

    def add(self, seq: Sequence) -> None:
        if seq.k != self.k:
            raise ValueError(f"this runner decodes with k={self.k}; the sequence asks for k={seq.k}")
        if self.pool.allocator.pages_for(seq.positions_needed) > self.engine.max_pages:
            raise ValueError(f"a sequence of {seq.positions_needed} positions exceeds the engine's page table "
                             f"({self.engine.max_pages} pages of {self.pool.page_size})")
        self.scheduler.add(seq)

    @torch.no_grad()
    def _admit(self) -> None:
        for seq in self.scheduler.admit():
            t0 = time.perf_counter()
            ids = seq.prompt
            try:
                for role in self.roles:  # every position but the last: it is the first query of the first step
                    prefill_into_pool(self.pool, role, seq.pages, ids[:-1], self.prefill_tokens, seq.ring_pages)
            except BaseException:
                self.cancel(seq)
                raise
            self.engine.load_slot(seq.slot, seq.pages, len(ids) - 1, ids[-1], ids[-2] if len(ids) > 1 else None,
                                  seed=seq.seed, temperature=seq.temperature, top_p=seq.top_p,
                                  ring_pages=seq.ring_pages)
            seq.stats.time_prefill = time.perf_counter() - t0
            seq.stats.engine = "batched"
            self.prefill_seconds += seq.stats.time_prefill

    def step(self) -> list[Sequence]:
        """Admit what fits, run one step of every running sequence, finish those that are done; returns them."""
        self._admit()
        running = list(self.scheduler.running)
        if not running:
            return []
        b = bucket_for(len(running), self.engine.max_batch)
        t0 = time.perf_counter()
        outs = self.graphs.step(b)
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        finished = []
        for seq, new in zip(running, outs):
            st = seq.stats
            st.steps += 1
            st.accepted += len(new) - 1
            st.accepted_hist[len(new) - 1] += 1
            seq.sink.add(new)
            if seq.done:
                finished.append(seq)
        for seq in finished:
            self._finish(seq)
        return finished

    def _finish(self, seq: Sequence) -> None:
        st = seq.stats
        st.drafted = self.k * st.steps
        sums = self.engine.kv_read_sum(seq.slot) if self.plan.sparse_layers and self.k else []
        st.kv_read_sum = kv_read_sums(self.n_layers, st.steps, self.plan.sparse_layers if self.k else [], sums)
        if self.k and self.mode == "draft":
            layers = self.plan.draft_sparse_layers if self.k > 1 else ()
            st.draft_kv_read_sum = kv_read_sums(self.n_draft_layers, st.steps, layers,
                                                self.engine.draft_kv_read_sum(seq.slot) if layers else [])
        st.new_tokens = len(seq.tokens)
        st.time_total = time.perf_counter() - seq.t_start
        self._release(seq)

    def cancel(self, seq: Sequence) -> None:
        """Drop a sequence (waiting or running); its pages return to the pool at once."""
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        slot = seq.slot
        moved = self.scheduler.finish(seq)
        if moved is not None:
            self.engine.move_slot(*moved)
        elif slot >= 0:
            self.engine.clear_slot(slot)

    def run(self, seqs: list[Sequence]) -> list[GenerationOutput]:
        """Decode ``seqs`` to completion (continuous batching past ``max_batch``); outputs in input order."""
        for seq in seqs:
            self.add(seq)
        try:
            while not self.scheduler.idle:
                self.step()
        except BaseException:
            for seq in seqs:  # a failed run returns every page it took
                if seq.status is not Status.FINISHED:
                    self.cancel(seq)
            raise
        return [GenerationOutput(s.tokens, s.stats, s.finish_reason) for s in seqs]
