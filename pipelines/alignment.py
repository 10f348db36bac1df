"""Monotone layer alignment: which draft layer guides each target layer.

A DTW-style dynamic program over the KL matrix. Walking down the target layers, the draft layer index may
stay (*repeat*: two target layers read the same draft layer), advance by one (*diagonal*), or jump ahead
(*skip*: draft layers in between guide nothing). The map minimising the summed ``KL[j, map[j]]`` over the sparse
target layers is found in ``O(Lt * Ld)``; the first ``dense_layers`` target layers stay dense (``-1``), and so do
any others named in ``also_dense`` (short sliding windows, :mod:`pipelines.candidates`): the map is monotone over
the remaining layers, which a dense layer between them does not constrain.
"""

from __future__ import annotations

import torch


def align_layers(kl: torch.Tensor, dense_layers: int = 0, also_dense=()) -> list[int]:
    """Optimal map ``target layer -> draft layer``, non-decreasing over the sparse target layers.

    Parameters
    ----------
    kl : torch.Tensor
        ``[n_target_layers, n_draft_layers]`` costs (``KL(target_j || draft_i)``), finite.
    dense_layers : int
        Leading target layers kept dense; they get ``-1`` and do not constrain the rest.
    also_dense : iterable of int
        Other target layers kept dense (``-1``, not constraining the rest either).

    Returns
    -------
    list[int]
        ``map[j]`` for every target layer. Among equal-cost maps, the one with the smallest indices wins.
    """
    also = sorted(set(also_dense))
    if any(not 0 <= j < kl.shape[0] for j in also):
        raise ValueError(f"also_dense={also} names layers outside the target's {kl.shape[0]}")
    if also:  # the DP over the remaining layers, in order
        keep = [j for j in range(kl.shape[0]) if j not in set(also)]
        out = [-1] * kl.shape[0]
        if keep:
            sub = align_layers(kl[keep], sum(j < dense_layers for j in keep))
            for j, i in zip(keep, sub):
                out[j] = i
        return out
    if kl.ndim != 2 or kl.shape[0] == 0 or kl.shape[1] == 0:
        raise ValueError(f"kl must be a non-empty [n_target, n_draft] matrix, got {tuple(kl.shape)}")
    if not torch.isfinite(kl).all():
        raise ValueError("kl has NaN or infinite entries; check the attention statistics")
    n_t, n_d = kl.shape
    if not 0 <= dense_layers <= n_t:
        raise ValueError(f"dense_layers={dense_layers} must be in [0, {n_t}]")
    cost = kl[dense_layers:].double()
    n = cost.shape[0]
    if n == 0:
        return [-1] * n_t
    # best[j, i]: least summed cost of layers dense_layers..dense_layers+j with layer j mapped to draft i.
    best = torch.empty(n, n_d, dtype=torch.float64)
    # came[j, i]: draft layer of target layer j-1 on that best path (argmin of best[j-1, :i+1]).
    came = torch.zeros(n, n_d, dtype=torch.long)
    best[0] = cost[0]
    for j in range(1, n):
        prefix_min, prefix_arg = _prefix_min(best[j - 1])  # any predecessor i' <= i: repeat, diagonal or skip
        best[j] = cost[j] + prefix_min
        came[j] = prefix_arg
    i = int(torch.argmin(best[-1]))  # first index among ties
    path = [i]
    for j in range(n - 1, 0, -1):
        i = int(came[j, i])
        path.append(i)
    return [-1] * dense_layers + path[::-1]


def _prefix_min(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running minimum and the first index attaining it: ``([min(x[:i+1])], [argmin(x[:i+1])])``."""
    vals, args = torch.empty_like(x), torch.empty(x.shape[0], dtype=torch.long)
    cur, arg = float("inf"), 0
    for i, v in enumerate(x.tolist()):
        if v < cur:
            cur, arg = v, i
        vals[i], args[i] = cur, arg
    return vals, args


def map_cost(kl: torch.Tensor, layer_map: list[int]) -> float:
    """Summed ``KL[j, map[j]]`` over the sparse (mapped) layers."""
    return float(sum(kl[j, i].double() for j, i in enumerate(layer_map) if i >= 0))


def align_heads(kl_heads: torch.Tensor) -> list[int]:
    """Per target KV head, the draft KV head whose chunk-pooled attention is closest: ``argmin`` of each row of
    ``kl_heads`` ``[Hkv_target, Hkv_draft]`` (``KL(target head || draft head)`` within one aligned layer pair; the
    first among ties). Heads are assigned independently: two target heads may follow the same draft head, since
    each only needs a good guide, and the draft records every head it is asked for once."""
    if kl_heads.ndim != 2 or 0 in kl_heads.shape:
        raise ValueError(f"kl_heads must be a non-empty [target heads, draft heads] matrix, got "
                         f"{tuple(kl_heads.shape)}")
    if not torch.isfinite(kl_heads).all():
        raise ValueError("kl_heads has NaN or infinite entries; check the attention statistics")
    return kl_heads.argmin(dim=1).tolist()
