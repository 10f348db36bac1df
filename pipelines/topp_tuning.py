"""Per-layer top-p thresholds: the smallest ``p`` whose draft-selected chunks keep enough of the target's attention.

Objective (default): for target layer ``j`` guided by draft layer ``map[j]``, select chunks by top-p on the
draft's pooled attention (exactly as the runtime does: sink and newest chunk kept) and measure *recall*, the
fraction of the target's own attention mass that falls on the selected chunks, averaged over query rows. The
tuned ``p`` is the smallest one with mean recall ``>= budget``. Recall is what bounds the error of attention
restricted to a subset (the paper's bound: output error <= left-out mass x value norm), and it can be measured
without running the target sparsely. Selected sets grow with ``p``, so mean recall is monotone in ``p`` and
bisection finds the smallest ``p`` to within ``tol``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specattn_runtime.pooling import chunk_token_counts
from specattn_runtime.selection import select_chunks


@dataclass(frozen=True)
class LayerRows:
    """Pooled attention rows of one layer pair, over the same query rows.

    ``draft`` / ``target`` float32 ``[N, C]``; ``n_valid`` int64 ``[N]`` chunks in each row's window;
    ``n_keys`` int64 ``[N]`` keys each row sees (position + 1).
    """

    draft: torch.Tensor
    target: torch.Tensor
    n_valid: torch.Tensor
    n_keys: torch.Tensor


def recall_and_kv(rows: LayerRows, p: float, chunk_size: int) -> tuple[float, float]:
    """Mean recall of target mass and mean fraction of keys read, selecting with top-p ``p`` on the draft."""
    sel = select_chunks(rows.draft, p, rows.n_valid)
    tgt = rows.target.double()
    recall = (tgt * sel).sum(-1) / tgt.sum(-1).clamp_min(1e-30)
    tokens = chunk_token_counts(rows.n_keys, rows.draft.shape[1], chunk_size)
    kv = (tokens * sel).sum(-1).double() / rows.n_keys.double()
    return float(recall.mean()), float(kv.mean())


def tune_p(rows: LayerRows, budget: float, chunk_size: int, tol: float = 1e-4) -> tuple[float, float, float]:
    """Smallest ``p`` (within ``tol``) with mean recall ``>= budget``; returns ``(p, recall, kv_fraction)``.

    ``p = 1.0`` (dense) always meets any budget in ``(0, 1]``.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"recall budget must lie in (0, 1], got {budget}")
    lo, hi = 0.0, 1.0  # f(lo) < budget is not known for lo = 0, but p -> 0 keeps only forced chunks
    hi_stats = recall_and_kv(rows, hi, chunk_size)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        stats = recall_and_kv(rows, mid, chunk_size)
        if stats[0] >= budget:
            hi, hi_stats = mid, stats
        else:
            lo = mid
    return hi, hi_stats[0], hi_stats[1]


def recall_curves(rows_per_layer: list[LayerRows | None], p_grid: torch.Tensor, chunk_size: int):
    """Recall and kv fraction for each layer at each ``p`` of ``p_grid``: two float32 ``[L, G]`` tensors.

    Dense layers (``None``) read everything: recall 1, kv 1.
    """
    n, g = len(rows_per_layer), p_grid.numel()
    recall, kv = torch.ones(n, g), torch.ones(n, g)
    for j, rows in enumerate(rows_per_layer):
        if rows is None:
            continue
        for k, p in enumerate(p_grid.tolist()):
            recall[j, k], kv[j, k] = recall_and_kv(rows, p, chunk_size)
    return recall, kv
