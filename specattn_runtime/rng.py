"""Counter-based random numbers: a hash of ``(seed, step, slot, index)``, the same stream everywhere.

Speculative sampling draws randomness in three places per step (each drafted token, the acceptance test, the
token emitted at the first rejection). A ``torch.Generator`` advances differently in eager code and in a captured
CUDA graph (it must be registered with each graph and its offsets replayed), and differently on CPU and GPU. A
hash of the draw's coordinates has no state: the eager loop, the graph-captured engine and the CPU all draw the
same numbers for the same seed, so a seeded run gives the same tokens on every path (tests compare them).

The hash is ``lowbias32`` (C. Wellons' integer hash, bias ~0.17 on the avalanche test), chained over the 32-bit
words of the coordinates. Arithmetic stays in int64 without overflow: products are formed from 16-bit halves.
Uniforms carry 24 random bits (a float32 mantissa) and lie in the open interval ``(0, 1)``.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
# slots: drafted token s uses slot s (s < k); these two sit far above any k
SLOT_ACCEPT = 1 << 20
SLOT_FINAL = (1 << 20) + 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` and ``c < 2**32``, with no intermediate >= 2**63."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _as_tensor(v, device) -> torch.Tensor:
    return v.to(device=device, dtype=torch.int64) if isinstance(v, torch.Tensor) else \
        torch.tensor([int(v)], dtype=torch.int64, device=device)


def uniform(seed, step, slot: int, n: int, device: torch.device | str) -> torch.Tensor:
    """float32 ``[n]`` uniforms in ``(0, 1)`` for draw ``(seed, step, slot)``.

    ``seed`` and ``step`` are ints or int64 tensors of one element (the engine keeps both on the device);
    ``seed`` must lie in ``[0, 2**62)``.
    """
    seed, step = _as_tensor(seed, device), _as_tensor(step, device)
    h = _hash32(torch.full_like(seed, slot & _M32))
    h = _hash32(h ^ (step & _M32))
    h = _hash32(h ^ ((step >> 32) & _M32))
    h = _hash32(h ^ (seed & _M32))
    h = _hash32(h ^ ((seed >> 32) & _M32))
    bits = _hash32(_hash32(torch.arange(n, dtype=torch.int64, device=device)) ^ h)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(weights: torch.Tensor, seed, step, slot: int) -> torch.Tensor:
    """One index drawn with probability proportional to ``weights`` (``[V]``, >= 0, not all 0): int64 ``[1]``.

    The exponential race: ``argmax(w / E)`` with ``E ~ Exp(1)`` i.i.d. is distributed as ``w / sum(w)``; no
    normalisation, no cumulative sum, no host synchronisation.
    """
    e = -torch.log(uniform(seed, step, slot, weights.shape[-1], weights.device))
    return torch.argmax(weights.float() / e, dim=-1, keepdim=True)


def new_seed() -> int:
    """A seed in ``[0, 2**62)`` from torch's default generator (so ``torch.manual_seed`` makes runs repeatable)."""
    return int(torch.randint(0, 2**62, (1,)))
