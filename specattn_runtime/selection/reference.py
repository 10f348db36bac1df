"""Sort-based top-p chunk selection: the obvious implementation, the oracle for the fast ones."""

from __future__ import annotations

import torch

from .common import valid_and_forced


def topp_mask_reference(scores: torch.Tensor, p: torch.Tensor, n_valid: torch.Tensor, *,
                        keep_sink: bool = True, keep_recent: int = 1,
                        recent_start: torch.Tensor | None = None) -> torch.Tensor:
    """Sort the free chunks by score, keep the shortest prefix that brings the mass to ``>= p * total``.

    ``scores`` float ``[rows, n_chunks]``, ``p`` float32 ``[rows]``, ``n_valid`` int64 ``[rows]``; returns bool
    ``[rows, n_chunks]``. Arithmetic in float64 so that this stays the reference for float32 kernels.
    """
    rows, n_chunks = scores.shape
    valid, forced = valid_and_forced(n_valid, n_chunks, keep_sink, keep_recent, recent_start)
    s = torch.where(valid, scores.double(), 0.0)
    total = s.sum(-1)  # [rows]
    target = p.double() * total
    forced_mass = torch.where(forced, s, 0.0).sum(-1)
    free = torch.where(valid & ~forced, s, -1.0)  # -1 sorts invalid/forced chunks last
    order = free.argsort(dim=-1, descending=True, stable=True)
    sorted_free = free.gather(-1, order).clamp_min(0.0)
    cum = forced_mass[:, None] + sorted_free.cumsum(-1)  # mass after taking i+1 free chunks
    # number of free chunks needed: count of prefixes still short of the target
    need = (cum < target[:, None]).sum(-1) + 1
    need = torch.where(forced_mass >= target, 0, need)
    take_sorted = torch.arange(n_chunks, device=scores.device)[None, :] < need[:, None]
    take = torch.zeros_like(valid).scatter(-1, order, take_sorted)
    mask = (take & valid & ~forced) | forced
    dense = (p >= 1.0) | (total <= 0)
    return torch.where(dense[:, None], valid, mask)
