"""Host wrapper for the Triton top-p selection kernel: check inputs, allocate (or take) outputs, launch."""

from __future__ import annotations

import torch

MAX_CHUNKS = 16384  # one row in registers: 16K chunks x 16 tokens = 256K keys
TERMS_PER_THREAD = 16  # register budget of a search pass's [2 * splits, tile] terms; longer rows loop over tiles


def topp_select_triton(scores: torch.Tensor, p: torch.Tensor, n_valid: torch.Tensor, *, keep_sink: bool = True,
                       keep_recent: int = 1, out_idx: torch.Tensor | None = None,
                       out_count: torch.Tensor | None = None, splits: int | None = None,
                       num_warps: int | None = None, pair_reduce: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected chunk indices, compacted: ``(idx int32 [rows, n_chunks], count int32 [rows])``.

    Row ``r`` selected ``idx[r, :count[r]]`` (increasing); slots past ``count[r]`` are left untouched.
    ``scores`` float ``[rows, n_chunks]`` (contiguous rows), ``p`` float32 ``[rows]``, ``n_valid`` ``[rows]``.
    Pass ``out_idx`` / ``out_count`` to reuse buffers (nothing is allocated then: CUDA-graph friendly).
    ``splits`` (cuts of the threshold bracket per search pass, a power of two >= 2; 2 is bisection) and
    ``num_warps`` default to :func:`launch_config`; they change the speed, never the result.
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
    default_splits, default_warps = launch_config(block)
    splits = default_splits if splits is None else int(splits)
    num_warps = default_warps if num_warps is None else int(num_warps)
    if splits < 2 or splits & (splits - 1) or splits > 64:
        raise ValueError(f"splits must be a power of two in [2, 64], got {splits}")
    tile = min(block, max(16, TERMS_PER_THREAD * 32 * num_warps // (2 * splits)))
    _topp_select_kernel[(rows,)](
        scores, p, n_valid, out_idx, out_count, n_chunks, scores.stride(0), out_idx.stride(0),
        KEEP_SINK=bool(keep_sink), KEEP_RECENT=int(keep_recent), BLOCK=block, SPLITS=splits, TILE=tile,
        PAIR_REDUCE=pair_reduce, num_warps=num_warps,
    )
    return out_idx, out_count


def launch_config(block: int) -> tuple[int, int]:
    """``(splits, num_warps)`` per padded row length: see bench/RESULTS.md for the H100 sweep behind them."""
    return 16, 4 if block <= 2048 else 8 if block <= 8192 else 16


def indices_to_mask(idx: torch.Tensor, count: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """Compacted selection -> bool mask ``[rows, n_chunks]`` (for the torch backend and for tests)."""
    slots = torch.arange(idx.shape[1], device=idx.device)[None, :] < count[:, None].long()
    # unused slots scatter into a spare column that is dropped: no boolean indexing, so no host sync
    target = torch.where(slots, idx.long(), n_chunks)
    mask = torch.zeros(idx.shape[0], n_chunks + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(1, target, True)[:, :n_chunks]
