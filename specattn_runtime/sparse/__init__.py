"""Block-sparse verification attention behind one function with an explicit ``backend``.

``torch`` (masked SDPA, exact, runs everywhere) is available now; the Triton kernel and the FlashInfer backend
plug in here with the same contract.
"""

from __future__ import annotations

import torch

from .reference import key_mask_from_chunks, sparse_attention_reference

BACKENDS = ("torch",)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_mask: torch.Tensor, *,
                     chunk_size: int, scale: float | None = None, backend: str = "torch") -> torch.Tensor:
    """See :func:`sparse_attention_reference` for shapes; ``backend`` picks the implementation."""
    if backend == "torch":
        return sparse_attention_reference(q, k, v, chunk_mask, chunk_size, scale)
    raise ValueError(f"unknown or unavailable sparse-attention backend {backend!r}; available: {BACKENDS}")


__all__ = ["sparse_attention", "sparse_attention_reference", "key_mask_from_chunks", "BACKENDS"]
