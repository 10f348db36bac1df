"""One CUDA graph per (phase, batch bucket) of a :class:`BatchEngine`; a step is "replay, read ``out``".

The sglang / vLLM graph-runner shape: the engine owns the static buffers, this object owns the graphs. Buckets are
captured on first use (or all at once with :meth:`capture`), largest first into one shared memory pool (the
phases hand data to each other only through the engine's buffers, so their intermediates may share memory).
Warm-up and capture run with every slot pointed at the scratch page and restored afterwards, so a bucket can be
captured while sequences are running without touching their caches or state. Off CUDA (or ``graphs=False``) the
phases run eagerly: the CPU path CI tests.
"""

from __future__ import annotations

import time

import torch

from .batch import BatchEngine
from .pages import SCRATCH_PAGE
from .step import StepTimes


class BatchGraphs:
    def __init__(self, engine: BatchEngine, graphs: bool = True):
        self.engine = engine
        self.enabled = graphs and engine.device.type == "cuda"
        self.graphs: dict[int, dict[str, torch.cuda.CUDAGraph]] = {}
        self.capture_seconds: dict[int, float] = {}
        self.times = StepTimes()
        bm, width = engine.out.shape
        self.host_out = torch.zeros(bm, width, dtype=torch.int64, pin_memory=self.enabled)
        if self.enabled:
            self._pool = torch.cuda.graph_pool_handle()
            self._events = [torch.cuda.Event(enable_timing=True) for _ in range(len(engine.phases) + 1)]
            self._done = torch.cuda.Event()

    def capture(self, buckets) -> float:
        """Capture the phases at each bucket (largest first); returns the seconds spent (0 off CUDA)."""
        t0 = time.perf_counter()
        for b in sorted(set(buckets), reverse=True):
            self._capture(b)
        return time.perf_counter() - t0

    def _capture(self, b: int) -> None:
        if not self.enabled or b in self.graphs:
            return
        t0 = time.perf_counter()
        eng = self.engine
        saved = _snapshot(eng)
        for table in eng.page_tables():  # warm-up writes land on the scratch pages only
            table.fill_(SCRATCH_PAGE)
        eng.L.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # the first run compiles; the second runs what will be captured
                for phase in eng.phases.values():
                    phase(b)
        torch.cuda.current_stream().wait_stream(side)
        graphs = {}
        with torch.no_grad():
            for name, phase in eng.phases.items():
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self._pool):
                    phase(b)
                graphs[name] = g
        _restore(eng, saved)
        torch.cuda.synchronize()
        self.graphs[b] = graphs
        self.capture_seconds[b] = time.perf_counter() - t0

    @torch.no_grad()
    def step(self, b: int) -> list[list[int]]:
        """One step of the first ``b`` slots; returns each slot's emitted tokens. The one host synchronisation."""
        eng = self.engine
        if self.enabled:
            self._capture(b)
            ev = self._events
            ev[0].record()
            for i, g in enumerate(self.graphs[b].values()):
                g.replay()
                ev[i + 1].record()
            self.host_out[:b].copy_(eng.out[:b], non_blocking=True)
            self._done.record()
            self._done.synchronize()
            for i, name in enumerate(eng.phases):  # complete events: reading them does not synchronise
                setattr(self.times, name, getattr(self.times, name) + ev[i].elapsed_time(ev[i + 1]) / 1e3)
            rows = self.host_out[:b].tolist()
        else:
            for name, phase in eng.phases.items():
                t0 = time.perf_counter()
                phase(b)
                setattr(self.times, name, getattr(self.times, name) + time.perf_counter() - t0)
            rows = eng.out[:b].tolist()
        return [r[1 : 1 + r[0]] for r in rows]


def _snapshot(eng: BatchEngine) -> list[torch.Tensor]:
    return [t.clone() for t in eng.phase_buffers()]


def _restore(eng: BatchEngine, saved: list[torch.Tensor]) -> None:
    for t, s in zip(eng.phase_buffers(), saved):
        t.copy_(s)
