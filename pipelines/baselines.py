"""Chunk selections the evaluation compares SpecAttn against, at a matched budget.

Every function returns which KV chunks each query reads, under the same rules as SpecAttn's selection: chunk
``c`` is visible to query ``t`` when ``c <= t // chunk_size``, and the query's own (newest) chunk is always read.
``budget`` int64 ``[T]`` is the number of chunks query ``t`` may read (own chunk included), typically the count
SpecAttn selected for that query and layer, so both methods read the same number of keys.
"""

from __future__ import annotations

import torch

from specattn_runtime.pooling import num_chunks


def _own_chunk(n_queries: int, chunk_size: int, device, n_keys: int | None = None) -> torch.Tensor:
    """Chunk of each query's own position, the queries being the last ``n_queries`` of ``n_keys`` positions."""
    first = 0 if n_keys is None else n_keys - n_queries
    return (first + torch.arange(n_queries, device=device)) // chunk_size  # [T]


def streaming_mask(budget: torch.Tensor, chunk_size: int, n_keys: int | None = None) -> torch.Tensor:
    """StreamingLLM (attention sink + recent window): chunk 0 plus the ``budget - 1`` newest chunks (own included).

    ``budget`` int64 ``[T]``; returns bool ``[T, C]`` with ``C = ceil(T / chunk_size)``. With ``n_keys``, the ``T``
    queries are the last of ``n_keys`` positions and ``C = ceil(n_keys / chunk_size)``.
    """
    t = budget.numel()
    own = _own_chunk(t, chunk_size, budget.device, n_keys)[:, None]
    c = torch.arange(num_chunks(n_keys or t, chunk_size), device=budget.device)[None, :]
    b = budget[:, None]
    # the sink takes one of the budget when there are two or more; a budget of one reads the own chunk only
    n_recent = torch.where(b >= 2, b - 1, 1)
    return (c <= own) & ((c > own - n_recent) | ((c == 0) & (b >= 2)))


def chunk_key_bounds(key: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk elementwise min and max of the keys: ``key`` ``[Hkv, T, D]`` -> two ``[Hkv, C, D]``."""
    hkv, t, d = key.shape
    c = num_chunks(t, chunk_size)
    pad = c * chunk_size - t
    k = key.float()
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")).view(hkv, c, chunk_size, d).amin(2)
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")).view(hkv, c, chunk_size, d).amax(2)
    return lo, hi


def quest_mask(query: torch.Tensor, key: torch.Tensor, budget: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Quest (Tang et al. 2024): per query head, the ``budget`` chunks with the largest upper bound on ``q . k``.

    The bound of chunk ``c`` is ``sum_d max(q_d * min_d(c), q_d * max_d(c))`` over the chunk's elementwise key
    bounds, which equals ``relu(q) . max + min(q, 0) . min``: two matrix products, no per-element max.

    Parameters
    ----------
    query : torch.Tensor
        ``[H, T, D]`` (RoPE applied, as attention sees it): the last ``T`` of the ``Tk`` key positions.
    key : torch.Tensor
        ``[Hkv, Tk, D]``; ``H`` is a multiple of ``Hkv`` (GQA heads share their group's keys).
    budget : torch.Tensor
        int64 ``[T]`` chunks per query.

    Returns
    -------
    torch.Tensor
        bool ``[H, T, C]`` with ``C = ceil(Tk / chunk_size)``; bounds tied with the cut are all kept (real-valued
        bounds rarely tie; the evaluation counts the keys actually read, so a tie never hides extra reads).
    """
    h, t, _ = query.shape
    lo, hi = chunk_key_bounds(key, chunk_size)
    rep = h // key.shape[0]
    lo, hi = lo.repeat_interleave(rep, 0), hi.repeat_interleave(rep, 0)  # [H, C, D]
    q = query.float()
    bound = q.clamp_min(0) @ hi.transpose(1, 2) + q.clamp_max(0) @ lo.transpose(1, 2)  # [H, T, C]
    own = _own_chunk(t, chunk_size, query.device, key.shape[1])[:, None]
    c = torch.arange(bound.shape[-1], device=query.device)[None, :]
    bound = bound.masked_fill(c > own, float("-inf")).masked_fill(c == own, float("inf"))
    # the budget-th largest bound per (head, query) is the cut; one sort, no rank inversion
    kth = bound.sort(dim=-1, descending=True).values.gather(
        -1, (budget.clamp(1, bound.shape[-1]) - 1)[None, :, None].expand(h, t, 1))
    return (bound >= kth) & (c <= own)
