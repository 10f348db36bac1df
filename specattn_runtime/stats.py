"""What ``SpecAttnRuntime.generate`` returns: the new tokens and the run's statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    steps: int = 0  # target forwards after the prefill (verification passes; one per token when k = 0)
    drafted: int = 0
    accepted: int = 0  # drafted tokens the target accepted
    accepted_hist: list[int] = field(default_factory=list)  # [n] = steps that accepted n drafts (n = 0 .. k)
    kv_read_sum: list[float] = field(default_factory=list)  # per target layer, summed over steps
    # per draft layer, the share of its keys the draft forwards after each step's first read, summed over steps
    # (sparse drafting; ``steps`` on layers that draft densely; empty when no draft ran)
    draft_kv_read_sum: list[float] = field(default_factory=list)
    time_draft: float = 0.0
    time_select: float = 0.0
    time_verify: float = 0.0
    time_prefill: float = 0.0
    time_total: float = 0.0
    time_capture: float = 0.0  # decode engine: cache allocation, warm-up, CUDA-graph capture (first use only)
    new_tokens: int = 0
    engine: str = "eager"  # "eager" (reference loop) or "static" (decode engine; CUDA graphs on CUDA)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification pass (accepted drafts + the target's own token)."""
        return (self.accepted + self.steps) / max(self.steps, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def kv_read_fraction(self) -> list[float]:
        """Per target layer: mean fraction of the KV rows its verification attention read."""
        return [s / max(self.steps, 1) for s in self.kv_read_sum]

    @property
    def draft_kv_read_fraction(self) -> list[float]:
        """Per draft layer: mean share of its KV rows the draft forwards after each step's first read (the first
        is dense: it records the attention the others' selection comes from)."""
        return [s / max(self.steps, 1) for s in self.draft_kv_read_sum]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.time_total, 1e-9)

    @property
    def time_decode(self) -> float:
        """Seconds spent decoding: everything after the prefill, less the one-off graph capture."""
        return self.time_total - self.time_prefill - self.time_capture

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after the prompt is prefilled (what long-context decoding speed means)."""
        return self.new_tokens / max(self.time_decode, 1e-9)

    def summary(self) -> dict:
        kv = self.kv_read_fraction
        return {"engine": self.engine, "new_tokens": self.new_tokens, "steps": self.steps,
                "mean_accepted_length": self.mean_accepted_length, "acceptance_rate": self.acceptance_rate,
                "kv_read_mean": sum(kv) / max(len(kv), 1),
                "draft_kv_read_mean": sum(dkv) / len(dkv) if (dkv := self.draft_kv_read_fraction) else None,
                "tokens_per_second": self.tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second, "time_prefill": self.time_prefill,
                "time_capture": self.time_capture, "time_draft": self.time_draft, "time_select": self.time_select,
                "time_verify": self.time_verify,
                "time_other": self.time_decode - self.time_draft - self.time_select - self.time_verify}


@dataclass
class GenerationOutput:
    tokens: list[int]  # new tokens only
    stats: GenerationStats
    finish_reason: str | None = None  # "stop" (EOS) or "length" (max_new_tokens), as OpenAI names them


class TokenSink:
    """The tokens a generation emits: cut at EOS and at ``max_new_tokens``, streamed to ``on_tokens``."""

    def __init__(self, max_new_tokens: int, eos_token_id: int | None, on_tokens=None):
        self.max_new_tokens, self.eos_token_id, self.on_tokens = max_new_tokens, eos_token_id, on_tokens
        self.tokens: list[int] = []
        self.done = False
        self.finish_reason: str | None = None

    def add(self, new: list[int]) -> None:
        """Take one step's tokens; sets ``done`` after EOS or when ``max_new_tokens`` are in."""
        if self.eos_token_id is not None and self.eos_token_id in new:
            new = new[: new.index(self.eos_token_id) + 1]
            self.done, self.finish_reason = True, "stop"
        new = new[: self.max_new_tokens - len(self.tokens)]
        self.tokens.extend(new)
        if self.on_tokens is not None:
            self.on_tokens(new)
        if not self.done and len(self.tokens) >= self.max_new_tokens:
            self.done, self.finish_reason = True, "length"


def kv_read_sums(n_layers: int, steps: int, sparse_layers, sparse_sums) -> list[float]:
    """Per target layer, the summed fraction of keys read: ``steps`` for dense layers (they read everything)."""
    sums = [float(steps)] * n_layers
    for j, v in zip(sparse_layers, sparse_sums):
        sums[j] = v
    return sums
