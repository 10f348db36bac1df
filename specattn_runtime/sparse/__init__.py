"""Block-sparse verification attention behind one function with an explicit ``backend``.

``torch`` (masked SDPA, exact, runs everywhere) and ``triton`` (split-K kernel reading compacted chunk indices;
CUDA, or the Triton interpreter on CPU). FlashInfer plugs in here with the same contract.
"""

from __future__ import annotations

import torch

from .reference import key_mask_from_chunks, sparse_attention_reference

BACKENDS = ("torch", "triton", "flashinfer")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_mask: torch.Tensor, *,
                     chunk_size: int, scale: float | None = None, backend: str = "torch") -> torch.Tensor:
    """See :func:`sparse_attention_reference` for shapes; ``backend`` picks the implementation."""
    if backend == "torch":
        return sparse_attention_reference(q, k, v, chunk_mask, chunk_size, scale)
    if backend == "triton":
        from .triton_attn import mask_to_indices, sparse_attention_triton

        idx, count = mask_to_indices(chunk_mask)
        return sparse_attention_triton(q, k, v, idx, count, chunk_size=chunk_size, scale=scale)
    if backend == "flashinfer":
        from .flashinfer_backend import available, sparse_attention_flashinfer

        if not available():
            raise ValueError("backend 'flashinfer' needs the flashinfer package (pip install specattn[gpu])")
        return sparse_attention_flashinfer(q, k, v, chunk_mask, chunk_size=chunk_size, scale=scale)
    raise ValueError(f"unknown or unavailable sparse-attention backend {backend!r}; available: {BACKENDS}")


__all__ = ["sparse_attention", "sparse_attention_reference", "key_mask_from_chunks", "BACKENDS"]
