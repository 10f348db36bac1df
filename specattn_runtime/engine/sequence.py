"""One request in the batched engine: its tokens, sampling settings, pages, and what it has emitted so far."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from ..stats import GenerationStats, TokenSink

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # admitted to the queue, no pages yet
    RUNNING = "running"  # prefilled, owns a batch slot and its pages
    FINISHED = "finished"  # pages returned


@dataclass(eq=False)
class Sequence:
    """A prompt to continue, and its progress.

    ``prompt`` holds every token id; the engine caches positions ``[0, len(prompt) - 1)`` at prefill and feeds
    the last one as the first query. ``pages`` are reserved for the whole generation at admission (prompt +
    ``max_new_tokens`` + one step's lookahead), so a running sequence never runs out of memory mid-step.
    """

    prompt: list[int]
    max_new_tokens: int
    k: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    eos_token_id: int | None = None
    on_tokens: object = None  # callable(list[int]) per step, for streaming
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    pages: list[int] = field(default_factory=list)
    ring_pages: list[int] = field(default_factory=list)  # its window layers' rings, where the pool keeps them
    slot: int = -1
    stats: GenerationStats = field(default_factory=GenerationStats)
    sink: TokenSink | None = None
    t_start: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.sink = TokenSink(self.max_new_tokens, self.eos_token_id, self.on_tokens)
        self.stats.accepted_hist = [0] * (self.k + 1)

    @property
    def positions_needed(self) -> int:
        """Cache positions this sequence may write: its prompt, its new tokens and one step's drafts (the
        verification writes ``k + 1`` positions past the cached length)."""
        return len(self.prompt) + self.max_new_tokens + self.k + 1

    @property
    def tokens(self) -> list[int]:
        return self.sink.tokens

    @property
    def done(self) -> bool:
        return self.sink.done

    @property
    def finish_reason(self) -> str | None:
        return self.sink.finish_reason
