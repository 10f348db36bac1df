"""The engine thread: the one owner of the batched engine, fed by HTTP handlers through a queue.

HTTP handlers run on the asyncio event loop; the device work runs here, on one thread, so no lock ever guards the
engine. Handlers :meth:`EngineLoop.submit` a :class:`Job` (a :class:`Sequence` and the asyncio queue its events go
to) and may :meth:`EngineLoop.cancel` it; the thread drains its inbox at every step boundary, so a new request joins
the running batch at the next step (the runner prefills it in chunks first) and a cancelled one leaves at once,
its pages back in the pool.

Each step's tokens are handed to the event loop as they are read (``call_soon_threadsafe``) and nothing more:
detokenising, stop strings, JSON and the sockets run on the event loop's thread while this thread is already in the
next step, which spends its time waiting on the device with the GIL released. What is left between two steps is
the runner's bookkeeping and this loop's inbox: :attr:`EngineLoop.busy_seconds` against
:attr:`EngineLoop.loaded_seconds` measures it (the device's idle share between steps under load).

Requests that sample and requests that decode greedily need different engine phases (``SAMPLING_MODES``), so the
loop keeps one :class:`BatchRunner` per sampling mode, built on first use, all over one paged pool and one page
allocator: admission by free pages is shared, and each step runs one runner's batch.

An exception inside a step fails that step's sequences (every running sequence of that runner) with a 500, returns
their pages and leaves the rest -- waiting requests, the other runners -- to go on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine.runner import BatchRunner
from ..engine.sequence import Sequence, Status
from ..engine.step import sampling_mode

log = logging.getLogger("specattn.serve")


class QueueFull(Exception):
    """The waiting queue holds ``max_waiting`` requests: answer 503 and ask the client to retry."""


@dataclass(eq=False)
class Job:
    """One request inside the engine: its sequence and the event queue its handler reads.

    Events (tuples): ``("tokens", ids)`` per step, then ``("done", finish_reason, stats)`` or
    ``("error", status, message)``.
    """

    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    eos_token_id: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    t_submit: float = field(default_factory=time.perf_counter)
    seq: Sequence | None = None

    @property
    def sampling(self) -> str:
        return sampling_mode(self.temperature, self.top_p)

    def push(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass


class EngineLoop:
    """Continuous batching over ``runner_factory(sampling) -> BatchRunner`` on a background thread.

    Parameters
    ----------
    runner_factory : callable
        ``sampling mode -> BatchRunner``; every runner must share one pool (and so one page allocator).
    k : int
        Drafted tokens per step of every sequence.
    max_waiting : int
        Requests accepted but not yet running; one more gets :class:`QueueFull`.
    metrics : Metrics, optional
        Counters and histograms to feed (``metrics.py``).
    step_hook : callable, optional
        Called with a runner's running sequences just before each of its steps, inside the step's error
        handling: an exception it raises fails that step as a device error would (tests force failures with it).
    """

    def __init__(self, runner_factory, *, k: int, max_waiting: int, metrics=None, step_hook=None):
        self.runner_factory, self.k, self.max_waiting = runner_factory, k, int(max_waiting)
        self.metrics, self.step_hook = metrics, step_hook
        self.runners: dict[str, BatchRunner] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted and not yet running, finished or cancelled (guarded by _lock)
        self._waiting: list[Job] = []  # the jobs counted in _queued that this thread has seen
        self._jobs: dict[int, Job] = {}  # seq_id -> live job
        self._thread: threading.Thread | None = None
        self.busy_seconds = 0.0  # steps and prefills while sequences were running
        self.loaded_seconds = 0.0  # wall time while sequences were running
        self.error: BaseException | None = None  # what stopped the thread, if it died

    # -- called from the event loop -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="specattn-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(("stop", None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when ``max_waiting`` requests are waiting already."""
        with self._lock:
            if self._queued >= self.max_waiting:
                raise QueueFull(f"{self._queued} requests are waiting for a batch slot (the server's limit)")
            self._queued += 1
        self._inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        """Drop ``job`` at the next step boundary (client gone, or a stop string matched); its pages return."""
        self._inbox.put(("cancel", job))

    @property
    def n_waiting(self) -> int:
        return self._queued

    @property
    def n_running(self) -> int:
        return sum(len(r.scheduler.running) for r in list(self.runners.values()))

    # -- the engine thread --------------------------------------------------------------------------------------------

    def _loaded(self) -> bool:
        return any(not r.scheduler.idle for r in self.runners.values())

    def _run(self) -> None:
        try:
            while True:
                loaded = self._loaded()
                t0 = time.perf_counter()
                busy0 = self._busy()
                if not self._drain(block=not loaded):
                    break
                for runner in list(self.runners.values()):
                    if not runner.scheduler.idle:
                        self._step(runner)
                self._admitted()
                if loaded:
                    self.loaded_seconds += time.perf_counter() - t0
                    self.busy_seconds += self._busy() - busy0
        except BaseException as e:  # noqa: BLE001 - a bug in the loop itself: fail everyone, /health says so
            self.error = e
            log.exception("the engine loop stopped")
            raise
        finally:
            self._fail_all(503, "the server is shutting down" if self.error is None else
                           f"the engine loop stopped: {self.error!r}")

    def _busy(self) -> float:
        return sum(r.step_seconds + r.prefill_seconds for r in self.runners.values())

    def _drain(self, block: bool) -> bool:
        """Apply every command in the inbox (waiting for one when idle); False on stop."""
        while True:
            try:
                op, job = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if op == "stop":
                return False
            if op == "add":
                self._add(job)
            elif op == "cancel":
                self._cancel(job)

    def _add(self, job: Job) -> None:
        seq = Sequence(job.prompt, job.max_new_tokens, self.k, temperature=job.temperature, top_p=job.top_p,
                       seed=job.seed, eos_token_id=job.eos_token_id, on_tokens=lambda new: job.push("tokens", new))
        try:
            runner = self.runners.get(job.sampling)
            if runner is None:
                runner = self.runners[job.sampling] = self.runner_factory(job.sampling)
            runner.add(seq)
        except Exception as e:  # noqa: BLE001 - refused here (the handler checked what it could): that job alone
            self._unqueue(1)
            job.push("error", 400 if isinstance(e, ValueError) else 500, str(e))
            return
        job.seq = seq
        self._jobs[seq.seq_id] = job
        self._waiting.append(job)

    def _cancel(self, job: Job) -> None:
        seq = job.seq
        if seq is None or self._jobs.pop(seq.seq_id, None) is None:
            return  # finished (or failed) already
        runner = self.runners[job.sampling]
        runner.cancel(seq)
        self._admitted()

    def _step(self, runner: BatchRunner) -> None:
        t0 = time.perf_counter()
        try:
            if self.step_hook is not None:
                self.step_hook(list(runner.scheduler.running))
            finished = runner.step()
        except Exception as e:  # noqa: BLE001 - one failed step fails its own sequences, not the server
            self._fail_step(runner, e)
            return
        if self.metrics is not None:
            self.metrics.step_seconds.observe(time.perf_counter() - t0)
        for seq in finished:
            job = self._jobs.pop(seq.seq_id, None)
            if job is not None:
                job.push("done", seq.finish_reason, seq.stats)

    def _fail_step(self, runner: BatchRunner, error: Exception) -> None:
        failed = list(runner.scheduler.running)
        log.error("a step of %d sequences failed: %r", len(failed), error, exc_info=error)
        for seq in failed:
            try:
                runner.cancel(seq)
            except Exception:  # noqa: BLE001 - the device state may be broken too: the pages at least come back
                runner.scheduler.finish(seq)
            job = self._jobs.pop(seq.seq_id, None)
            if job is not None:
                job.push("error", 500, f"the engine step failed: {type(error).__name__}: {error}")
        self._admitted()

    def _admitted(self) -> None:
        """Jobs that left the waiting queue (running, finished, cancelled) stop counting against ``max_waiting``."""
        left = [j for j in self._waiting if j.seq.status is not Status.WAITING]
        if left:
            self._waiting = [j for j in self._waiting if j.seq.status is Status.WAITING]
            self._unqueue(len(left))

    def _unqueue(self, n: int) -> None:
        with self._lock:
            self._queued -= n

    def _fail_all(self, status: int, message: str) -> None:
        for job in list(self._jobs.values()):
            job.push("error", status, message)
        self._jobs.clear()
        while True:  # commands that never reached the loop
            try:
                op, job = self._inbox.get(block=False)
            except queue.Empty:
                break
            if op == "add":
                job.push("error", status, message)
