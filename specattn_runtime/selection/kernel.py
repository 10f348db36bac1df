"""Triton kernel: sorting-free top-p chunk selection, one program per row, output compacted on device.

Same result as :mod:`.threshold` (an exact search over the int32 bit patterns of the non-negative float32 scores
for the largest threshold whose mass still reaches ``p``), with the row held in registers, no sort, no host sync.
The search is radix-``2**RADIX_BITS``: each pass fixes ``RADIX_BITS`` more bits of the threshold by evaluating all
``2**RADIX_BITS`` candidates in one 2-D masked reduction, so 31 bits take ``ceil(31 / RADIX_BITS)`` dependent
passes instead of 31 (``RADIX_BITS = 1`` is plain bisection). The time of this kernel is the latency of those
dependent reductions, so fewer, wider passes are what make it fast. Selected chunk indices are written in
increasing order with a prefix sum, followed by the per-row count.
"""

import triton
import triton.language as tl


@triton.jit
def _count(flags, LOG2: tl.constexpr):
    """Sum of the ``2**LOG2`` entries of ``flags`` by halving (reshape + split): no block-wide reduction.

    The pass's masses come out of their reduction spread over the threads in a layout Triton would convert
    (through shared memory, with barriers) before a ``tl.max``; halving keeps the work inside each thread:
    measured on the H100 (bench/RESULTS.md) it cuts a 16-pass search by up to 2 us (2K keys: 6.2 -> 4.2 us).
    """
    x = flags
    for i in tl.static_range(LOG2 - 1):
        a, b = tl.split(tl.reshape(x, (1 << (LOG2 - 1 - i), 2)))
        x = a + b
    a, b = tl.split(x)
    return a + b


@triton.jit
def _topp_select_kernel(
    scores_ptr, p_ptr, n_valid_ptr, recent_ptr, idx_ptr, count_ptr,
    n_chunks, stride_s, stride_i,
    KEEP_SINK: tl.constexpr, KEEP_RECENT: tl.constexpr, RECENT_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
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
    if RECENT_FROM_PTR:
        forced = forced | (offs >= tl.load(recent_ptr + row))
    elif KEEP_RECENT > 0:
        forced = forced | (offs >= n_valid - KEEP_RECENT)
    forced = forced & valid
    is_free = valid & ~forced
    free = tl.where(is_free, s, 0.0)
    bits = tl.where(is_free, free.to(tl.int32, bitcast=True), -1)  # order-preserving for s >= 0; -1: never taken
    total = tl.sum(s, axis=0)
    target = p * total
    forced_mass = tl.sum(tl.where(forced, s, 0.0), axis=0)
    # Invariant: mass(lo) >= target (lo = 0 takes every chunk). Each pass tries lo + d << shift for every digit d
    # and keeps the largest that still reaches the target; after the last pass lo is the exact threshold. The
    # masses fall with d (float sums of nested subsets in one fixed order, rounding being monotone), so the
    # largest such digit is the number of digits >= 1 that reach the target.
    N_PASSES: tl.constexpr = (31 + RADIX_BITS - 1) // RADIX_BITS
    digits = tl.arange(0, 1 << RADIX_BITS)
    digits64 = digits.to(tl.int64)
    lo = tl.zeros((), dtype=tl.int64)
    for i in tl.static_range(N_PASSES):
        shift = RADIX_BITS * (N_PASSES - 1 - i)
        cand = lo + (digits64 << shift)  # [RADIX] int64: may pass 2**31 in the top pass
        in_range = cand < 2147483648
        cand32 = tl.where(in_range, cand, 2147483647).to(tl.int32)  # past every finite float pattern
        mass = forced_mass + tl.sum(tl.where(bits[None, :] >= cand32[:, None], free[None, :], 0.0), axis=1)
        ok = (mass >= target) & in_range & (digits > 0)  # digit 0 (= lo) reaches the target by the invariant
        lo = lo + (_count(ok.to(tl.int32), RADIX_BITS).to(tl.int64) << shift)
    lo32 = lo.to(tl.int32)
    # zero-score chunks are never needed once some positive mass suffices: bits > 0 unless the threshold is 0
    take = (bits >= lo32) & ((bits > 0) | (lo32 == 0))
    sel = tl.where(forced_mass >= target, forced, take | forced)
    dense = (p >= 1.0) | (total <= 0.0)
    sel = tl.where(dense, valid, sel)
    sel_i = sel.to(tl.int32)
    pos = tl.cumsum(sel_i, axis=0) - 1  # output slot of each selected chunk: indices stay sorted
    tl.store(idx_ptr + row * stride_i + pos, offs, mask=sel_i > 0)
    # the count is the scan's last entry, stored by the thread holding it: a block-wide sum would cost one more
    # reduction (0.2 us of 7.8 at 8K keys, bench/selection_variants_h100.json)
    tl.store(count_ptr + row + offs * 0, pos + 1, mask=offs == BLOCK - 1)
