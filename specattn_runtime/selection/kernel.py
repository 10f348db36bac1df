"""Triton kernel: sorting-free top-p chunk selection, one program per row, output compacted on device.

Same result as :mod:`.threshold` (the largest threshold whose mass still reaches ``p``, found over the int32 bit
patterns of the non-negative float32 scores, so the cut is exact) with no sort and no host sync.

The search narrows a bracket ``[lo, hi)`` of bit patterns with the invariant ``mass(>= lo) >= target >
mass(>= hi)``. Each pass evaluates ``SPLITS`` evenly spaced cuts of the bracket in one 2-D masked reduction (mass
and count of the chunks at or above every cut) and keeps the sub-bracket that still straddles the target. It stops
as soon as the bracket holds a single chunk: that chunk is the last one the top-p set needs, so the set
``{score >= lo}`` is already the exact answer. On attention rows that takes 2-4 passes instead of the 31 of a plain
bisection, and every pass costs the latency of one block-wide reduction, which is what this kernel's time is.

The bracket starts at ``[(1 - p) * total / (2 n), max]``: the last chunk of the top-p set is larger than
``(1 - p) * total / n`` (the chunks from it down hold more than ``1 - p`` of the mass, and there are at most ``n``
of them), halved against float rounding. Selected chunk indices are written in increasing order with a prefix
sum, followed by the per-row count.
"""

import triton
import triton.language as tl


@triton.jit
def _add_pair(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _masses(bits, free, cand, SPLITS: tl.constexpr, PAIR_REDUCE: tl.constexpr):
    """``[2 * SPLITS]`` sums over the chunks given: mass (first half) and count (second half) of the chunks at or
    above each cut. One block-wide reduction: its latency is the cost of a search pass."""
    if PAIR_REDUCE:
        kk = tl.arange(0, 2 * SPLITS)
        ge = bits[None, :] >= cand[:, None]
        m, c = tl.reduce((tl.where(ge, free[None, :], 0.0), ge.to(tl.float32)), 1, _add_pair)
        return tl.where(kk < SPLITS, m, c)
    return tl.sum(_contributions(bits, free, cand, SPLITS), axis=1)


@triton.jit
def _contributions(bits, free, cand, SPLITS: tl.constexpr):
    """``[2 * SPLITS, n]``: each chunk's mass, then 1, where it is at or above the cut (``cand`` holds the cuts
    twice); summed over chunks this is :func:`_masses`. Counts stay exact in float32 (<= 16K chunks)."""
    kk = tl.arange(0, 2 * SPLITS)
    val = tl.where((kk < SPLITS)[:, None], free[None, :], 1.0)
    return tl.where(bits[None, :] >= cand[:, None], val, 0.0)


@triton.jit
def _row_tile(scores_ptr, offs, n_chunks, n_valid, KEEP_SINK: tl.constexpr, KEEP_RECENT: tl.constexpr):
    """Scores of chunks ``offs`` of one row: ``(score, forced, free)`` with ``free`` = score of chunks that are
    neither forced (sink, newest) nor outside the window, else 0."""
    valid = (offs < n_valid) & (offs < n_chunks)
    s = tl.load(scores_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    forced = offs < 0  # all False
    if KEEP_SINK:
        forced = forced | (offs == 0)
    if KEEP_RECENT > 0:
        forced = forced | (offs >= n_valid - KEEP_RECENT)
    forced = forced & valid
    return s, forced, tl.where(valid & ~forced, s, 0.0)


@triton.jit
def _topp_select_kernel(
    scores_ptr, p_ptr, n_valid_ptr, idx_ptr, count_ptr,
    n_chunks, stride_s, stride_i,
    KEEP_SINK: tl.constexpr, KEEP_RECENT: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
    TILE: tl.constexpr, PAIR_REDUCE: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = scores_ptr + row * stride_s
    offs = tl.arange(0, BLOCK)
    n_valid = tl.load(n_valid_ptr + row)
    p = tl.load(p_ptr + row)
    s, forced, free = _row_tile(row_ptr, offs, n_chunks, n_valid, KEEP_SINK, KEEP_RECENT)
    bits = free.to(tl.int32, bitcast=True)  # order-preserving for s >= 0
    # total and forced mass in one reduction ([2, BLOCK] -> [2], the same in every thread)
    two = tl.arange(0, 2)
    sums = tl.sum(tl.where((two == 0)[:, None], s[None, :], tl.where(forced, s, 0.0)[None, :]), axis=1)
    total = tl.sum(tl.where(two == 0, sums, 0.0), axis=0)
    forced_mass = tl.sum(tl.where(two == 1, sums, 0.0), axis=0)
    target = p * total
    searching = (p < 1.0) & (total > 0.0) & (forced_mass < target)

    # bracket: no chunk exceeds the total (a float sum of non-negative terms is >= each term), and the last chunk
    # of the set exceeds (1 - p) * total / n; both cost no reduction beyond the sums above
    hi = total.to(tl.int32, bitcast=True).to(tl.int64) + 1
    floor = 0.5 * (1.0 - p) * total / n_valid.to(tl.float32)
    # >= 1: the smallest positive pattern still takes every chunk with mass, and never takes a zero-score chunk
    lo = tl.maximum(tl.minimum(floor.to(tl.int32, bitcast=True).to(tl.int64), hi - 1), 1)
    n_hi = tl.zeros((), dtype=tl.float32)  # free chunks at or above hi (counts kept in float32, exact)
    m = tl.where(searching, n_valid, 0).to(tl.float32)  # free chunks in [lo, hi): an upper bound at first
    kk = tl.arange(0, 2 * SPLITS)
    cut = kk % SPLITS
    while (m > 1) & (hi - lo > 1):
        cand = (lo + (hi - lo) * cut // SPLITS).to(tl.int32)  # cut 0 = lo; the others strictly inside
        if BLOCK <= TILE:  # the row is in registers already
            r = _masses(bits, free, cand, SPLITS, PAIR_REDUCE)
        else:  # bound registers: accumulate over tiles re-read from L1, reduce once
            acc = tl.zeros((2 * SPLITS, TILE), dtype=tl.float32)
            for start in range(0, n_valid, TILE):
                _, _, free_t = _row_tile(row_ptr, start + tl.arange(0, TILE), n_chunks, n_valid, KEEP_SINK,
                                         KEEP_RECENT)
                acc += _contributions(free_t.to(tl.int32, bitcast=True), free_t, cand, SPLITS)
            r = tl.sum(acc, axis=1)
        # r is replicated in every thread: what follows is per-thread arithmetic, no further reduction
        # largest cut that still reaches the target (cut 0 = lo always does, up to float rounding)
        j = tl.max(tl.where((kk < SPLITS) & (forced_mass + r >= target), kk, 0), axis=0)
        last = j == SPLITS - 1
        n_lo = tl.sum(tl.where(kk == SPLITS + j, r, 0.0), axis=0)
        n_hi = tl.where(last, n_hi, tl.sum(tl.where(kk == SPLITS + j + 1, r, 0.0), axis=0))
        new_lo = lo + (hi - lo) * j // SPLITS
        hi = tl.where(last, hi, lo + (hi - lo) * (j + 1) // SPLITS)
        lo = new_lo
        m = n_lo - n_hi

    lo32 = lo.to(tl.int32)
    valid = (offs < n_valid) & (offs < n_chunks)
    sel = ((bits >= lo32) & valid & ~forced) | forced
    sel = tl.where(forced_mass >= target, forced, sel)
    dense = (p >= 1.0) | (total <= 0.0)
    sel = tl.where(dense, valid, sel)
    sel_i = sel.to(tl.int32)
    pos = tl.cumsum(sel_i, axis=0) - 1  # output slot of each selected chunk: indices stay sorted
    tl.store(idx_ptr + row * stride_i + pos, offs, mask=sel_i > 0)
    tl.store(count_ptr + row, tl.sum(sel_i, axis=0))
