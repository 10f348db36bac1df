"""Host wrapper for the Triton top-p selection kernel: check inputs, allocate (or take) outputs, launch."""

from __future__ import annotations

import torch

MAX_CHUNKS = 16384  # one row in registers: 16K chunks x 16 tokens = 256K keys


def topp_select_triton(scores: torch.Tensor, p: torch.Tensor, n_valid: torch.Tensor, *, keep_sink: bool = True,
                       keep_recent: int = 1, out_idx: torch.Tensor | None = None,
                       out_count: torch.Tensor | None = None,
                       radix_bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected chunk indices, compacted: ``(idx int32 [rows, n_chunks], count int32 [rows])``.

    Row ``r`` selected ``idx[r, :count[r]]`` (increasing); slots past ``count[r]`` are left untouched.
    ``scores`` float ``[rows, n_chunks]`` (contiguous rows), ``p`` float32 ``[rows]``, ``n_valid`` ``[rows]``.
    Pass ``out_idx`` / ``out_count`` to reuse buffers (nothing is allocated then: CUDA-graph friendly).
    ``radix_bits``: threshold bits fixed per pass (1 = bisection, 31 passes); default per row length, see
    :func:`default_radix_bits`.
    """
    from .kernel import _topp_select_kernel
    import triton

    rows, n_chunks = scores.shape
    if n_chunks > MAX_CHUNKS:
        raise ValueError(f"{n_chunks} chunks exceed the kernel's {MAX_CHUNKS}; use a larger chunk_size")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    p = p.to(device=scores.device, dtype=torch.float32).contiguous()
    n_valid = n_valid.to(device=scores.device, dtype=torch.int32).contiguous()
    if out_idx is None:
        out_idx = torch.empty(rows, n_chunks, dtype=torch.int32, device=scores.device)
    if out_count is None:
        out_count = torch.empty(rows, dtype=torch.int32, device=scores.device)
    block = max(16, triton.next_power_of_2(n_chunks))
    radix_bits = default_radix_bits(block) if radix_bits is None else int(radix_bits)
    if not 1 <= radix_bits <= 8:
        raise ValueError(f"radix_bits must lie in [1, 8], got {radix_bits}")
    _topp_select_kernel[(rows,)](
        scores, p, n_valid, out_idx, out_count, n_chunks, scores.stride(0), out_idx.stride(0),
        KEEP_SINK=bool(keep_sink), KEEP_RECENT=int(keep_recent), BLOCK=block, RADIX_BITS=radix_bits,
        num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16,
    )
    return out_idx, out_count


def default_radix_bits(block: int) -> int:
    """Bits per search pass. Measured on an H100 (bench/RESULTS.md): 2 bits (16 passes of 4 candidates) beat
    bisection by 10-20% up to 2K chunks and tie at 8K; 4 bits lose (16 x block candidates spill registers)."""
    return 2


def indices_to_mask(idx: torch.Tensor, count: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """Compacted selection -> bool mask ``[rows, n_chunks]`` (for the torch backend and for tests)."""
    slots = torch.arange(idx.shape[1], device=idx.device)[None, :] < count[:, None].long()
    # unused slots scatter into a spare column that is dropped: no boolean indexing, so no host sync
    target = torch.where(slots, idx.long(), n_chunks)
    mask = torch.zeros(idx.shape[0], n_chunks + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(1, target, True)[:, :n_chunks]
