"""Sorting-free top-p chunk selection (torch): binary search on the threshold, exact in 31 steps.

For non-negative float32 values the order of the numbers equals the order of their int32 bit patterns, so the
search runs over integers in ``[0, 2**31)``: 31 halvings end on the exact cut value, with no tolerance and no
sort. Each step is one masked reduction over the row, which is what the Triton kernel does per row in SRAM.
"""

from __future__ import annotations

import torch

from .common import valid_and_forced

SEARCH_STEPS = 31  # bits of a non-negative float32 pattern


def topp_mask_threshold(scores: torch.Tensor, p: torch.Tensor, n_valid: torch.Tensor, *,
                        keep_sink: bool = True, keep_recent: int = 1,
                        recent_start: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`topp_mask_reference` (``recent_start``: see ``valid_and_forced``); returns bool
    ``[rows, n_chunks]``. No host synchronisation: the decode engine captures it in a graph."""
    rows, n_chunks = scores.shape
    valid, forced = valid_and_forced(n_valid, n_chunks, keep_sink, keep_recent, recent_start)
    s = torch.where(valid, scores.float(), 0.0)
    free = torch.where(valid & ~forced, s, 0.0)
    bits = free.view(torch.int32)  # monotone in the value for s >= 0
    total = s.sum(-1)
    target = p * total
    forced_mass = torch.where(forced, s, 0.0).sum(-1)
    # Invariant: mass(lo) >= target (lo = 0 takes every chunk); mass(hi) < target or hi is past every value.
    lo = torch.zeros(rows, dtype=torch.int64, device=s.device)
    hi = torch.full((rows,), 2**31, dtype=torch.int64, device=s.device)
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        mass = forced_mass + torch.where(bits >= mid[:, None], free, 0.0).sum(-1)
        ok = mass >= target
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    # lo is the largest threshold whose mass still reaches the target: the free chunks >= it are the top-p set.
    # Zero-score chunks are never needed once some positive mass suffices, so require bits > 0 unless lo is 0.
    take = (bits >= lo[:, None]) & ((bits > 0) | (lo[:, None] == 0))
    mask = (take & valid & ~forced) | forced
    mask = torch.where((forced_mass >= target)[:, None], forced, mask)
    dense = (p >= 1.0) | (total <= 0)
    return torch.where(dense[:, None], valid, mask)
