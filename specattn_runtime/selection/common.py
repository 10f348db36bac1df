"""Pieces shared by the selection implementations: validity and forced (always-kept) chunks."""

from __future__ import annotations

import torch


def valid_and_forced(n_valid: torch.Tensor, n_chunks: int, keep_sink: bool, keep_recent: int,
                     recent_start: torch.Tensor | None = None):
    """``valid`` and ``forced`` bool masks ``[rows, n_chunks]``; the ``keep_recent`` newest chunks are forced, or,
    when ``recent_start`` (int ``[rows]``) is given, every chunk from ``recent_start[r]`` on."""
    idx = torch.arange(n_chunks, device=n_valid.device)[None, :]
    valid = idx < n_valid[:, None]
    forced = torch.zeros_like(valid)
    if keep_sink:
        forced |= idx == 0
    if recent_start is not None:
        forced |= idx >= recent_start.to(n_valid.device)[:, None]
    elif keep_recent:
        forced |= idx >= (n_valid[:, None] - int(keep_recent))
    return valid, forced & valid
