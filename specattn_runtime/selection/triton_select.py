"""Host wrapper for the Triton top-p selection kernel: check inputs, allocate (or take) outputs, launch."""

from __future__ import annotations

import functools

import torch

MAX_CHUNKS = 16384  # one row in registers: 16K chunks x 16 tokens = 256K keys


def topp_select_triton(scores: torch.Tensor, p: torch.Tensor, n_valid: torch.Tensor, *, keep_sink: bool = True,
                       keep_recent: int = 1, out_idx: torch.Tensor | None = None,
                       out_count: torch.Tensor | None = None, radix_bits: int | None = None,
                       num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected chunk indices, compacted: ``(idx int32 [rows, n_chunks], count int32 [rows])``.

    Row ``r`` selected ``idx[r, :count[r]]`` (increasing); slots past ``count[r]`` are left untouched.
    ``scores`` float ``[rows, n_chunks]`` (contiguous rows), ``p`` float32 ``[rows]``, ``n_valid`` ``[rows]``.
    Pass ``out_idx`` / ``out_count`` to reuse buffers (nothing is allocated then: CUDA-graph friendly).
    ``radix_bits`` (threshold bits fixed per pass; 1 = bisection, 31 passes) and ``num_warps`` default to
    :func:`launch_config`; they change the speed, never the result.
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
    default_bits, default_warps = launch_config(block, rows, scores.device)
    radix_bits = default_bits if radix_bits is None else int(radix_bits)
    num_warps = default_warps if num_warps is None else int(num_warps)
    if not 1 <= radix_bits <= 8:
        raise ValueError(f"radix_bits must lie in [1, 8], got {radix_bits}")
    _topp_select_kernel[(rows,)](
        scores, p, n_valid, out_idx, out_count, n_chunks, scores.stride(0), out_idx.stride(0),
        KEEP_SINK=bool(keep_sink), KEEP_RECENT=int(keep_recent), BLOCK=block, RADIX_BITS=radix_bits,
        num_warps=num_warps,
    )
    return out_idx, out_count


def launch_config(block: int, rows: int, device: torch.device) -> tuple[int, int]:
    """``(radix_bits, num_warps)`` for rows padded to ``block`` chunks, from the H100 sweeps in bench/RESULTS.md.

    2 bits per pass (16 passes of 4 candidates) beat bisection and 4 bits everywhere measured. The kernel's time is
    the latency of its dependent block-wide reductions, so warps are a trade: more warps shorten each pass's
    arithmetic on long rows, fewer make each reduction cheaper. With more rows than multiprocessors the rows
    also compete for the same SMs, and fewer warps per row win (256 rows of 8K chunks: 4 warps 57 us, 8 warps
    68 us; 32 rows: 54 vs 31 us). 16K-chunk rows are unmeasured: the 8K choice, doubled.
    """
    crowded = rows > (_sm_count(device.index) if device.type == "cuda" else 132)
    if block <= 128:
        warps = 1  # 6.2 vs 9.0 us at 4 warps (256 rows of 128 chunks)
    elif block <= 512:
        warps = 4
    elif block <= 8192:
        warps = 4 if crowded else 8
    else:
        warps = 8 if crowded else 16
    return 2, warps


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()) \
        .multi_processor_count


def indices_to_mask(idx: torch.Tensor, count: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """Compacted selection -> bool mask ``[rows, n_chunks]`` (for the torch backend and for tests)."""
    slots = torch.arange(idx.shape[1], device=idx.device)[None, :] < count[:, None].long()
    # unused slots scatter into a spare column that is dropped: no boolean indexing, so no host sync
    target = torch.where(slots, idx.long(), n_chunks)
    mask = torch.zeros(idx.shape[0], n_chunks + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(1, target, True)[:, :n_chunks]
