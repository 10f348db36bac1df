"""Top-p chunk selection: the smallest set of KV chunks holding at least a fraction ``p`` of a row's attention mass.

Contract shared by every implementation (``method=`` of :func:`select_chunks`):

- ``scores`` float ``[rows, n_chunks]`` >= 0: chunk-pooled attention (of the draft, at run time).
- ``p`` float or float ``[rows]`` in ``(0, 1]``; ``p >= 1`` means dense (every valid chunk).
- ``n_valid`` int ``[rows]`` >= 1: chunks ``>= n_valid`` are outside the row's causal window, never selected.
- The sink chunk 0 and the ``keep_recent`` newest chunks (default 1: chunk ``n_valid - 1``) are always selected
  and their mass counts toward ``p``;
  the rest is the fewest further chunks (largest first) that bring the mass to ``>= p * total``.
- A row whose mass is zero selects every valid chunk (no information: stay dense).
"""

from __future__ import annotations

import torch

from .reference import topp_mask_reference
from .threshold import topp_mask_threshold

METHODS = ("sort", "threshold", "triton")


def _check(scores: torch.Tensor, p, n_valid: torch.Tensor | None):
    if scores.ndim != 2:
        raise ValueError(f"scores must be [rows, n_chunks], got shape {tuple(scores.shape)}")
    rows, n_chunks = scores.shape
    p = torch.as_tensor(p, dtype=torch.float32, device=scores.device).expand(rows).contiguous()
    if not torch.isfinite(p).all() or ((p <= 0) | (p > 1)).any():
        raise ValueError(f"p must lie in (0, 1], got values in [{p.min().item()}, {p.max().item()}]")
    if n_valid is None:
        n_valid = torch.full((rows,), n_chunks, dtype=torch.int64, device=scores.device)
    n_valid = n_valid.to(device=scores.device, dtype=torch.int64)
    if n_valid.shape != (rows,) or ((n_valid < 1) | (n_valid > n_chunks)).any():
        raise ValueError(f"n_valid must be [rows] with values in [1, {n_chunks}]")
    if torch.isnan(scores).any() or (scores < 0).any():
        raise ValueError("scores must be non-negative and not NaN (pooled attention probabilities)")
    return p, n_valid


def select_chunks(scores: torch.Tensor, p, n_valid: torch.Tensor | None = None, *, method: str = "sort",
                  keep_sink: bool = True, keep_recent: int = 1) -> torch.Tensor:
    """Boolean selection mask ``[rows, n_chunks]``; see the module docstring for the contract."""
    p, n_valid = _check(scores, p, n_valid)
    if method == "sort":
        return topp_mask_reference(scores, p, n_valid, keep_sink=keep_sink, keep_recent=keep_recent)
    if method == "threshold":
        return topp_mask_threshold(scores, p, n_valid, keep_sink=keep_sink, keep_recent=keep_recent)
    if method == "triton":
        from .triton_select import indices_to_mask, topp_select_triton

        idx, count = topp_select_triton(scores, p, n_valid, keep_sink=keep_sink, keep_recent=keep_recent)
        return indices_to_mask(idx, count, scores.shape[1])
    raise ValueError(f"unknown selection method {method!r}; choose one of {METHODS}")


__all__ = ["select_chunks", "topp_mask_reference", "topp_mask_threshold", "METHODS"]
