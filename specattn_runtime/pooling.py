"""Chunk pooling: token-level attention rows -> chunk-level mass (chunk = ``chunk_size`` consecutive keys)."""

from __future__ import annotations

import torch


def num_chunks(n_keys: int, chunk_size: int) -> int:
    return -(-n_keys // chunk_size)


def pool_to_chunks(probs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Sum attention probabilities over consecutive key chunks.

    Parameters
    ----------
    probs : torch.Tensor
        ``[..., n_keys]`` attention weights (any float dtype).
    chunk_size : int
        Keys per chunk; the last chunk may be partial.

    Returns
    -------
    torch.Tensor
        float32 ``[..., ceil(n_keys / chunk_size)]``; each row keeps the total mass of its input row.
    """
    n = probs.shape[-1]
    c = num_chunks(n, chunk_size)
    pad = c * chunk_size - n
    x = probs.float()
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(*x.shape[:-1], c, chunk_size).sum(-1)


def chunk_token_counts(n_keys: torch.Tensor, n_chunks: int, chunk_size: int) -> torch.Tensor:
    """Number of real keys in each chunk for rows that see ``n_keys`` keys: int64 ``[rows, n_chunks]``."""
    starts = torch.arange(n_chunks, device=n_keys.device) * chunk_size
    return (n_keys[:, None] - starts[None, :]).clamp(0, chunk_size)
