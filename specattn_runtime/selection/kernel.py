"""Triton kernel: sorting-free top-p chunk selection, one program per row, output compacted on device.

Same algorithm as :mod:`.threshold` (exact 31-step binary search over the int32 bit patterns of the non-negative
float32 scores), with the row held in registers: 31 masked reductions, no sort, no host sync. Selected chunk
indices are written in increasing order with a prefix sum, followed by the per-row count.
"""

import triton
import triton.language as tl


@triton.jit
def _topp_select_kernel(
    scores_ptr, p_ptr, n_valid_ptr, idx_ptr, count_ptr,
    n_chunks, stride_s, stride_i,
    KEEP_SINK: tl.constexpr, KEEP_RECENT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    n_valid = tl.load(n_valid_ptr + row)
    p = tl.load(p_ptr + row)
    valid = offs < n_valid
    s = tl.load(scores_ptr + row * stride_s + offs, mask=valid & (offs < n_chunks), other=0.0).to(tl.float32)
    forced = offs < 0  # all False
    if KEEP_SINK:
        forced = forced | (offs == 0)
    if KEEP_RECENT > 0:
        forced = forced | (offs >= n_valid - KEEP_RECENT)
    forced = forced & valid
    free = tl.where(valid & ~forced, s, 0.0)
    bits = free.to(tl.int32, bitcast=True)  # order-preserving for s >= 0
    total = tl.sum(s, axis=0)
    target = p * total
    forced_mass = tl.sum(tl.where(forced, s, 0.0), axis=0)
    # invariant: mass(lo) >= target; hi = 2**31 is past every pattern
    lo = tl.zeros((), dtype=tl.int64)
    hi = tl.full((), 2147483648, dtype=tl.int64)
    for _ in range(31):
        mid = (lo + hi) // 2
        mass = forced_mass + tl.sum(tl.where(bits.to(tl.int64) >= mid, free, 0.0), axis=0)
        ok = mass >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    take = (bits.to(tl.int64) >= lo) & ((bits > 0) | (lo == 0))
    sel = (take & valid & ~forced) | forced
    sel = tl.where(forced_mass >= target, forced, sel)
    dense = (p >= 1.0) | (total <= 0.0)
    sel = tl.where(dense, valid, sel)
    sel_i = sel.to(tl.int32)
    pos = tl.cumsum(sel_i, axis=0) - 1  # output slot of each selected chunk: indices stay sorted
    tl.store(idx_ptr + row * stride_i + pos, offs, mask=sel_i > 0)
    tl.store(count_ptr + row, tl.sum(sel_i, axis=0))
