"""Temporary: selection-kernel variants for one GPU exploration run (see _explore_sel.py)."""
import triton
import triton.language as tl

from specattn_runtime.selection.kernel import _count


@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _pick(vec, digits, d, LOG2: tl.constexpr):
    """vec[d] by halving (no block-wide reduction): vec and digits [2**LOG2], d scalar."""
    return _count(tl.where(digits == d, vec, 0), LOG2)


@triton.jit
def _topp_v2(
    scores_ptr, p_ptr, n_valid_ptr, idx_ptr, count_ptr,
    n_chunks, stride_s, stride_i,
    KEEP_SINK: tl.constexpr, KEEP_RECENT: tl.constexpr, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr,
    EARLY: tl.constexpr, MAX_PASSES: tl.constexpr, COUNT_FROM_SCAN: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    n_valid = tl.load(n_valid_ptr + row)
    p = tl.load(p_ptr + row)
    valid = offs < n_valid
    s = tl.load(scores_ptr + row * stride_s + offs, mask=valid & (offs < n_chunks), other=0.0).to(tl.float32)
    forced = offs < 0
    if KEEP_SINK:
        forced = forced | (offs == 0)
    if KEEP_RECENT > 0:
        forced = forced | (offs >= n_valid - KEEP_RECENT)
    forced = forced & valid
    is_free = valid & ~forced
    free = tl.where(is_free, s, 0.0)
    bits = tl.where(is_free, free.to(tl.int32, bitcast=True), -1)  # non-free never counted
    total = tl.sum(s, axis=0)
    target = p * total
    forced_mass = tl.sum(tl.where(forced, s, 0.0), axis=0)
    N_PASSES: tl.constexpr = (31 + RADIX_BITS - 1) // RADIX_BITS
    R: tl.constexpr = 1 << RADIX_BITS
    digits = tl.arange(0, R)
    digits64 = digits.to(tl.int64)
    lo = tl.zeros((), dtype=tl.int64)
    lo_cnt = tl.sum(is_free.to(tl.int32), axis=0)
    hi_cnt = tl.zeros((), dtype=tl.int32)
    for i in tl.static_range(min(N_PASSES, MAX_PASSES)):
        if (not EARLY) or (lo_cnt - hi_cnt > 1):
            shift = RADIX_BITS * (N_PASSES - 1 - i)
            cand = lo + (digits64 << shift)
            in_range = cand < 2147483648
            cand32 = tl.where(in_range, cand, 2147483647).to(tl.int32)
            ge = bits[None, :] >= cand32[:, None]
            if EARLY:
                m, c = tl.reduce((tl.where(ge, free[None, :], 0.0), ge.to(tl.int32)), 1, _add2)
            else:
                m = tl.sum(tl.where(ge, free[None, :], 0.0), axis=1)
                c = tl.zeros((R,), dtype=tl.int32)
            ok = (forced_mass + m >= target) & in_range & (digits > 0)
            d = _count(ok.to(tl.int32), RADIX_BITS)
            if EARLY:
                new_hi = tl.where(d + 1 < R, _pick(c, digits, d + 1, RADIX_BITS), hi_cnt)
                lo_cnt = _pick(c, digits, d, RADIX_BITS)
                hi_cnt = new_hi
            lo = lo + (d.to(tl.int64) << shift)
    lo32 = lo.to(tl.int32)
    take = (bits >= lo32) & ((bits > 0) | (lo32 == 0))
    sel = take | forced
    sel = tl.where(forced_mass >= target, forced, sel)
    dense = (p >= 1.0) | (total <= 0.0)
    sel = tl.where(dense, valid, sel)
    sel_i = sel.to(tl.int32)
    pos = tl.cumsum(sel_i, axis=0) - 1
    tl.store(idx_ptr + row * stride_i + pos, offs, mask=sel_i > 0)
    if COUNT_FROM_SCAN:
        tl.store(count_ptr + row + offs * 0, pos + 1, mask=offs == BLOCK - 1)  # no reduction: the scan's last
    else:
        tl.store(count_ptr + row, tl.sum(sel_i, axis=0))


def run_v2(scores, p, n_valid, out_idx, out_count, *, bits=2, warps=4, early=True, max_passes=99,
           count_from_scan=True, keep_recent=1):
    rows, c = scores.shape
    block = max(16, triton.next_power_of_2(c))
    _topp_v2[(rows,)](scores, p, n_valid, out_idx, out_count, c, scores.stride(0), out_idx.stride(0),
                      KEEP_SINK=True, KEEP_RECENT=keep_recent, BLOCK=block, RADIX_BITS=bits, EARLY=early,
                      MAX_PASSES=max_passes, COUNT_FROM_SCAN=count_from_scan, num_warps=warps)
    return out_idx, out_count


@triton.jit
def _sum_max_sum(a0, b0, c0, a1, b1, c1):
    return a0 + a1, tl.maximum(b0, b1), c0 + c1


@triton.jit
def _topp_v3(
    scores_ptr, p_ptr, n_valid_ptr, idx_ptr, count_ptr,
    n_chunks, stride_s, stride_i,
    KEEP_SINK: tl.constexpr, KEEP_RECENT: tl.constexpr, BLOCK: tl.constexpr, LOWER: tl.constexpr,
    WHILE: tl.constexpr, LOG2C: tl.constexpr,
):
    """Bracket [lo, hi) of bit patterns from the row's bounds, cut in 5 per pass (4 candidates, all useful)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    n_valid = tl.load(n_valid_ptr + row)
    p = tl.load(p_ptr + row)
    valid = offs < n_valid
    s = tl.load(scores_ptr + row * stride_s + offs, mask=valid & (offs < n_chunks), other=0.0).to(tl.float32)
    forced = offs < 0
    if KEEP_SINK:
        forced = forced | (offs == 0)
    if KEEP_RECENT > 0:
        forced = forced | (offs >= n_valid - KEEP_RECENT)
    forced = forced & valid
    is_free = valid & ~forced
    free = tl.where(is_free, s, 0.0)
    bits = tl.where(is_free, free.to(tl.int32, bitcast=True), -1)
    total, top, forced_mass = tl.reduce((s, free, tl.where(forced, s, 0.0)), 0, _sum_max_sum)
    target = p * total
    # t* <= the largest free score: past it only the forced mass is left, short of the target
    hi = top.to(tl.int32, bitcast=True).to(tl.int64) + 1
    lo = tl.zeros((), dtype=tl.int64)
    if LOWER:
        # every score below t contributes < t, so mass(>= t) >= total - n_free * t >= target for
        # t <= (1 - p) * total / n_free; 3 n eps covers the float32 rounding of both sums, and half of it the rest
        # n_valid >= the number of free chunks: a larger n only lowers the bound
        low = 0.5 * ((1.0 - p) - 3.0 * BLOCK * 1.1920929e-07) * total / n_valid.to(tl.float32)
        lo = tl.where(low > 0.0, tl.minimum(low.to(tl.int32, bitcast=True).to(tl.int64), hi - 1), lo)
    C: tl.constexpr = 1 << LOG2C
    mult = (tl.arange(0, C) + 1).to(tl.int64)
    if WHILE:
        while hi - lo > 1:
            step = (hi - lo + C) // (C + 1)
            cand = lo + mult * step
            cand32 = tl.minimum(cand, 2147483647).to(tl.int32)
            mass = forced_mass + tl.sum(tl.where(bits[None, :] >= cand32[:, None], free[None, :], 0.0), axis=1)
            k = _count(((mass >= target) & (cand < hi)).to(tl.int64), LOG2C)
            hi = tl.minimum(hi, lo + (k + 1) * step)
            lo = lo + k * step
    else:
        for _ in tl.static_range(14 if LOG2C == 2 else 10):  # 5**14, 9**10 > 2**31
            if hi - lo > 1:
                step = (hi - lo + C) // (C + 1)
                cand = lo + mult * step
                cand32 = tl.minimum(cand, 2147483647).to(tl.int32)
                mass = forced_mass + tl.sum(tl.where(bits[None, :] >= cand32[:, None], free[None, :], 0.0), axis=1)
                k = _count(((mass >= target) & (cand < hi)).to(tl.int64), LOG2C)
                hi = tl.minimum(hi, lo + (k + 1) * step)
                lo = lo + k * step
    lo32 = lo.to(tl.int32)
    take = (bits >= lo32) & ((bits > 0) | (lo32 == 0))
    sel = tl.where(forced_mass >= target, forced, take | forced)
    dense = (p >= 1.0) | (total <= 0.0)
    sel = tl.where(dense, valid, sel)
    sel_i = sel.to(tl.int32)
    pos = tl.cumsum(sel_i, axis=0) - 1
    tl.store(idx_ptr + row * stride_i + pos, offs, mask=sel_i > 0)
    tl.store(count_ptr + row + offs * 0, pos + 1, mask=offs == BLOCK - 1)


def run_v3(scores, p, n_valid, out_idx, out_count, *, warps=4, lower=True, use_while=True, keep_recent=1,
           log2c=2):
    rows, c = scores.shape
    block = max(16, triton.next_power_of_2(c))
    _topp_v3[(rows,)](scores, p, n_valid, out_idx, out_count, c, scores.stride(0), out_idx.stride(0),
                      KEEP_SINK=True, KEEP_RECENT=keep_recent, BLOCK=block, LOWER=lower, WHILE=use_while, LOG2C=log2c,
                      num_warps=warps)
    return out_idx, out_count
