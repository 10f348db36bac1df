"""Host wrapper for the Triton top-p selection kernel: check inputs, allocate (or take) outputs, launch."""

from __future__ import annotations

import functools

import torch

MAX_CHUNKS = 16384  # one row in registers: 16K chunks x 16 tokens = 256K keys


def topp_select_triton(scores: torch.Tensor, p: torch.Tensor, n_valid: torch.Tensor, *, keep_sink: bool = True,
                       keep_recent: int = 1, recent_start: torch.Tensor | None = None,
                       out_idx: torch.Tensor | None = None,
                       out_count: torch.Tensor | None = None, radix_bits: int | None = None,
                       num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected chunk indices, compacted: ``(idx int32 [rows, n_chunks], count int32 [rows])``.

    Row ``r`` selected ``idx[r, :count[r]]`` (increasing); slots past ``count[r]`` are left untouched.
    ``scores`` float ``[rows, n_chunks]`` (contiguous rows), ``p`` float32 ``[rows]``, ``n_valid`` ``[rows]``.
    Pass ``out_idx`` / ``out_count`` to reuse buffers (nothing is allocated then: CUDA-graph friendly).
    ``recent_start`` int32 ``[rows]`` (device): keep every chunk from ``recent_start[r]`` on instead of the
    ``keep_recent`` newest; the decode engine's verified positions move every step, their chunk index stays on
    the device.
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
    from_ptr = recent_start is not None
    if from_ptr:
        recent_start = recent_start.to(device=scores.device, dtype=torch.int32)
    _topp_select_kernel[(rows,)](
        scores, p, n_valid, recent_start if from_ptr else n_valid, out_idx, out_count, n_chunks, scores.stride(0),
        out_idx.stride(0), KEEP_SINK=bool(keep_sink), KEEP_RECENT=int(keep_recent), RECENT_FROM_PTR=from_ptr,
        BLOCK=block, RADIX_BITS=radix_bits, num_warps=num_warps,
    )
    return out_idx, out_count


def launch_config(block: int, rows: int, device: torch.device) -> tuple[int, int]:
    """``(radix_bits, num_warps)`` for rows padded to ``block`` chunks, from the H100 sweeps in bench/RESULTS.md.

    2 bits per pass (16 passes of 4 candidates) beat 3 and 4 bits everywhere measured, and bisection everywhere
    but on 512-chunk rows (7.7 vs 7.3 us at one warp, not worth a special case). The kernel's time is the
    latency of its 16 dependent passes, so warps are a trade: one warp reduces with shuffles alone, no barriers,
    but does the arithmetic of every chunk of the row; more warps share that arithmetic and pay for a block-wide
    reduction per pass (0.3 us per pass at 4 warps on 512-chunk rows, 0.55 on 2048: searches cut short in
    bench/selection_variants_h100.json). With more rows than multiprocessors the rows also compete for the same
    SMs, and fewer warps per row win.
    """
    if block <= 512:
        return 2, 1  # 8K keys: 7.9 us at 1 warp vs 9.1 at 4 (256 rows); 2K: 4.5 vs 7.4
    if block <= 1024:
        return 2, 4  # 16K keys: 9.4 us vs 10.2 at 2 warps and 12.0 at 1 (256 rows); 8.7 vs 9.4 at 8 (32 rows)
    if block <= 4096:
        crowded = rows > (_sm_count(device.index) if device.type == "cuda" else 132)
        return 2, 4 if crowded else 8  # 32K keys: 12.7 vs 13.7 us at 256 rows, 11.1 vs 10.8 at 32 rows
    return 2, 16  # 128K keys: 48.1 us vs 55.7 at 4 warps and 60.9 at 8 (256 rows); 256K keys unmeasured


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()) \
        .multi_processor_count


def indices_to_mask(idx: torch.Tensor, count: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """Compacted selection ``idx [..., C]``, ``count [...]`` -> bool mask ``[..., n_chunks]`` (for the torch
    backend and for tests)."""
    slots = torch.arange(idx.shape[-1], device=idx.device) < count[..., None].long()
    # unused slots scatter into a spare column that is dropped: no boolean indexing, so no host sync
    target = torch.where(slots, idx.long(), n_chunks)
    mask = torch.zeros(*idx.shape[:-1], n_chunks + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, target, True)[..., :n_chunks]
