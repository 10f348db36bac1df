"""Block-sparse verification attention behind one function with an explicit ``backend``.

``torch`` (masked SDPA, exact, runs everywhere), ``triton`` (split-K kernel reading compacted chunk indices;
CUDA, or the Triton interpreter on CPU) and ``flashinfer`` (``BlockSparseAttentionWrapper``, when installed).
"""

from __future__ import annotations

import torch

from ..variants import PLAIN, Variant
from .reference import (attention_with_lengths_reference, key_mask_from_chunks, sparse_attention_paged_reference,
                        sparse_attention_reference)

BACKENDS = ("torch", "triton", "flashinfer")


Selection = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Selection, *,
                     chunk_size: int, scale: float | None = None, backend: str = "torch",
                     page_table: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
                     variant: Variant = PLAIN) -> torch.Tensor:
    """See :func:`sparse_attention_reference` for shapes; ``backend`` picks the implementation.

    ``selection`` is a bool chunk mask ``[B, C]`` (``[B, Hkv, C]``: one per KV head; torch and Triton backends) or
    the selection kernel's compacted ``(idx [B, C], count [B])`` (per head: ``[B, Hkv, C]``, ``[B, Hkv]``);
    each backend converts only when its own form differs (the Triton path from kernel indices converts nothing).
    With ``page_table`` / ``kv_lens``, ``k`` / ``v`` are page pools (see
    :func:`sparse_attention_paged_reference`); the torch and Triton backends take them. A ``variant`` other than
    plain causal attention (sliding window, soft-capping, sinks) is implemented by the torch and Triton backends
    (contiguous or paged); FlashInfer's wrapper refuses it.
    """
    per_head = (selection[0] if isinstance(selection, tuple) else selection).ndim == 3
    if per_head and (backend == "flashinfer" or page_table is not None):
        raise ValueError(f"a selection per KV head ([B, Hkv, C]) needs backend 'torch' or 'triton' over a "
                         f"contiguous cache (got backend {backend!r}{', paged' if page_table is not None else ''})")
    if not variant.plain and backend == "flashinfer":
        raise ValueError("sliding windows, soft-capping and attention sinks need backend 'torch' or 'triton'; "
                         "FlashInfer's block-sparse wrapper implements plain causal attention only")
    if backend == "triton":
        from .triton_attn import mask_to_indices, sparse_attention_triton

        idx, count = selection if isinstance(selection, tuple) else mask_to_indices(selection)
        return sparse_attention_triton(q, k, v, idx, count, chunk_size=chunk_size, scale=scale,
                                       page_table=page_table, kv_lens=kv_lens, window=variant.window,
                                       softcap=variant.softcap, sinks=variant.sinks)
    chunk_mask = selection
    paged = page_table is not None
    if isinstance(selection, tuple):
        from ..selection.triton_select import indices_to_mask

        n_keys = page_table.shape[1] * k.shape[1] if paged else k.shape[2]
        chunk_mask = indices_to_mask(*selection, n_chunks=-(-n_keys // chunk_size))
    if backend == "torch" and paged:
        return sparse_attention_paged_reference(q, k, v, page_table, kv_lens, chunk_mask, chunk_size, scale,
                                                variant)
    if backend == "torch":
        return sparse_attention_reference(q, k, v, chunk_mask, chunk_size, scale, variant)
    if paged:
        raise ValueError(f"backend {backend!r} takes a contiguous cache; use 'triton' or 'torch' for a paged one")
    if backend == "flashinfer":
        from .flashinfer_backend import available, sparse_attention_flashinfer

        if not available():
            raise ValueError("backend 'flashinfer' needs the flashinfer package (pip install specattn[gpu])")
        return sparse_attention_flashinfer(q, k, v, chunk_mask, chunk_size=chunk_size, scale=scale)
    raise ValueError(f"unknown or unavailable sparse-attention backend {backend!r}; available: {BACKENDS}")


__all__ = ["sparse_attention", "sparse_attention_reference", "sparse_attention_paged_reference",
           "attention_with_lengths_reference", "key_mask_from_chunks", "BACKENDS"]
