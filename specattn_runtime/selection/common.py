"""Pieces shared by the selection implementations: validity and forced (always-kept) chunks."""

from __future__ import annotations

import torch


def valid_and_forced(n_valid: torch.Tensor, n_chunks: int, keep_sink: bool, keep_recent: int):
    """``valid`` and ``forced`` bool masks ``[rows, n_chunks]``; ``keep_recent`` newest chunks are forced."""
    idx = torch.arange(n_chunks, device=n_valid.device)[None, :]
    valid = idx < n_valid[:, None]
    forced = torch.zeros_like(valid)
    if keep_sink:
        forced |= idx == 0
    if keep_recent:
        forced |= idx >= (n_valid[:, None] - int(keep_recent))
    return valid, forced & valid
