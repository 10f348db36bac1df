"""Triton kernel: block-sparse verification attention, split-K over the selected chunks, GQA-aware.

One program per (sequence, KV head, split). It holds every query row that reads this KV head, i.e. all
``G = H // Hkv`` query heads times all ``Tq`` verified positions (``M = G * Tq`` rows), so each selected K/V
chunk is loaded once for all of them. Chunks come straight from the selection kernel's compacted index buffer
(``idx[b, :count[b]]``; per KV head, ``idx[b, h, :count[b, h]]``: head strides 0 share one selection),
``CHUNKS_PER_ITER`` of them gathered per iteration into one ``[CHUNKS_PER_ITER * CHUNK]``
key tile; these groups are dealt round-robin to the splits. Each split writes a partial (unnormalised output,
running max, running sum); ``_combine_kernel`` merges the splits.

Two cache layouts, one kernel: contiguous ``[B, Hkv, Tk, D]`` (a transformers cache layer) or paged (``PAGED``):
pools ``[n_pages, PAGE, Hkv, D]`` and a page table ``[B, max_pages]``. A page holds whole chunks, so a chunk's
keys are consecutive rows of one page; the gather adds one page-table read per key (the keys of a chunk read the
same entry) before its K/V loads: 6-17% on the H100 (bench/RESULTS.md). ``RAGGED``
reads each sequence's key count from ``len_ptr`` (paged batches are ragged; the decode engine keeps its lengths on
the device so that one captured graph serves every step) instead of the scalar ``n_keys``.

``DENSE`` reads every chunk up to the key count (no index buffer): the same kernel is the engine's dense decode
attention with a device-side length. ``RECORD`` also writes, per query row and chunk it reads, the chunk's max
logit and its sum of exponentials relative to that max (log2 domain). Once the row's log-sum-exp is known
(``_combine_kernel`` writes it), the chunk's attention mass is ``l_c * 2**(m_c - lse)``: the draft's chunk-pooled
attention, computed without a probability matrix and without a second pass over the keys.
``_pool_record_kernel`` sums those masses into score rows: one per sequence (head-averaged) or one per KV head
(its group of query heads averaged: per-KV-head selection).

Attention variants, each a constexpr switch (off: the code compiled before they existed, no extra work):
``WINDOW`` (sliding window: key ``s`` visible to query ``t`` iff ``t - window < s <= t``; keys older than every
row's window are never loaded, and the dense path starts at the window's first chunk), ``SOFTCAP``
(``softcap * tanh(logit / softcap)`` on the scaled logit, before the mask) and, in ``_combine_kernel``, ``SINKS``
(a per-query-head logit in the softmax denominator only). Recording sees the logits the output used.

``RING``: the cache of a sliding-window layer is a ring of ``ring`` slots, position ``p`` at slot ``p % ring`` (a
contiguous ring, or, paged, the sequence's ring pages: slot ``s`` at row ``s % PAGE`` of page ``table[s // PAGE]``).
Only the load address changes: positions, the window, chunk ids and recorded chunks stay logical, and the window
bound (keys below ``lo`` are never loaded) is what keeps an overwritten slot unread.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from exp2 of a non-positive argument (no overflow; core Triton has no tanh on every version we run:
    3.6 on the GPU machine, 3.9 in CI). Absolute error ~1e-7: a soft-capped logit moves by ~softcap * 1e-7."""
    e = tl.exp2(tl.abs(x) * -2.8853900817779268)  # e^(-2|x|); 2 / ln(2)
    th = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -th, th)


@triton.jit
def _sparse_attn_split_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, count_ptr, o_part_ptr, m_part_ptr, l_part_ptr,
    table_ptr, len_ptr, rec_m_ptr, rec_l_ptr, sm_scale, n_keys, window, softcap, ring, stride_tb,
    stride_rb, stride_rh, stride_rm,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ib, stride_ih, stride_cb, stride_ch,
    stride_ob, stride_oh, stride_os, stride_om,
    Q_LEN: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr, CHUNKS_PER_ITER: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    RAGGED: tl.constexpr, DENSE: tl.constexpr, RECORD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, RING: tl.constexpr,
):
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    BLOCK_N: tl.constexpr = CHUNK * CHUNKS_PER_ITER

    # rows: m = g * Q_LEN + t  (query head kvh * GROUP + g, verified position t)
    offs_m = tl.arange(0, BLOCK_M)
    g = offs_m // Q_LEN
    t = offs_m % Q_LEN
    row_ok = offs_m < GROUP * Q_LEN
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + b * stride_qb + (kvh * GROUP + g)[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if RAGGED:
        n_keys = tl.load(len_ptr + b)
    # absolute position of each row's query; clamped at 0 for the engine's first draft forward after a one-token
    # prompt, whose two rows are the same token at position 0 (they must see the same key)
    q_pos = tl.maximum(n_keys - Q_LEN + t, 0)
    # WINDOW: key s is visible to query t iff t - window < s <= t. ``lo`` is the oldest key any row of this program
    # can see (the first query's window start): keys below it are never loaded (masked loads read no bytes), and
    # the dense path starts at its chunk, so whole chunks outside the window are not even visited.
    if WINDOW:
        lo = tl.maximum(tl.maximum(n_keys - Q_LEN, 0) - window + 1, 0)
        first = lo // CHUNK  # dense path: the first chunk holding a visible key
    else:
        first = 0

    # Groups of CHUNKS_PER_ITER selected chunks are dealt round-robin to the splits: every split gets its share
    # of however many chunks were selected, with no host sync to learn the count.
    if DENSE:
        count = tl.cdiv(n_keys, CHUNK) - first if WINDOW else tl.cdiv(n_keys, CHUNK)
    else:
        count = tl.load(count_ptr + b * stride_cb + kvh * stride_ch)
    n_groups = tl.cdiv(count, CHUNKS_PER_ITER)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln(2): exp2 instead of exp

    offs_n = tl.arange(0, BLOCK_N)
    for grp in range(split, n_groups, tl.num_programs(1)):
        slot = grp * CHUNKS_PER_ITER + offs_n // CHUNK
        slot_ok = slot < count
        if DENSE:
            chunk = first + slot if WINDOW else slot
        else:
            chunk = tl.load(idx_ptr + b * stride_ib + kvh * stride_ih + slot, mask=slot_ok, other=0)
        key_pos = chunk * CHUNK + offs_n % CHUNK
        key_ok = slot_ok & (key_pos < n_keys)
        if WINDOW:  # a selected chunk older than every row's window: its keys are not loaded
            key_ok = key_ok & (key_pos >= lo)
        slot_pos = key_pos % ring if RING else key_pos  # RING: position p lives at slot p % ring
        if PAGED:  # stride_kb / stride_vb step over pages; rows of a page are slots
            page = tl.load(table_ptr + b * stride_tb + slot_pos // PAGE, mask=key_ok, other=0).to(tl.int64)
            k_row = (page * stride_kb)[:, None] + (slot_pos % PAGE)[:, None] * stride_kt
            v_row = (page * stride_vb)[:, None] + (slot_pos % PAGE)[:, None] * stride_vt
        else:
            k_row = b * stride_kb + slot_pos[:, None] * stride_kt
            v_row = b * stride_vb + slot_pos[:, None] * stride_vt
        k = tl.load(k_ptr + k_row + kvh * stride_kh + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + v_row + kvh * stride_vh + offs_d[None, :], mask=key_ok[:, None], other=0.0)
        if SOFTCAP:  # softcap * tanh(logit / softcap), on the scaled logit (natural domain), then to log2
            s = _tanh(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (sm_scale / softcap))
            s = s * (softcap * 1.4426950408889634)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        visible = key_ok[None, :] & (key_pos[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & (key_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        if RECORD:  # per chunk of this tile: max logit and sum of 2^(s - max), for rows and chunks actually read
            s3 = tl.reshape(s, (BLOCK_M, CHUNKS_PER_ITER, CHUNK))
            cm = tl.max(s3, axis=2)
            cm = tl.where(cm == float("-inf"), 0.0, cm)  # a chunk this row cannot see: l = 0 below, mass 0
            cl = tl.sum(tl.exp2(s3 - cm[:, :, None]), axis=2)
            cslot = grp * CHUNKS_PER_ITER + tl.arange(0, CHUNKS_PER_ITER)
            cok = cslot < count
            if DENSE:
                cid = first + cslot if WINDOW else cslot
            else:
                cid = tl.load(idx_ptr + b * stride_ib + kvh * stride_ih + cslot, mask=cok, other=0)
            r_ptrs = b * stride_rb + kvh * stride_rh + offs_m[:, None] * stride_rm + cid[None, :]
            r_ok = row_ok[:, None] & cok[None, :]
            tl.store(rec_m_ptr + r_ptrs, cm, mask=r_ok)
            tl.store(rec_l_ptr + r_ptrs, cl, mask=r_ok)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows that have seen nothing yet keep m = -inf: shift by 0 there to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    base = b * stride_ob + kvh * stride_oh + split * stride_os
    tl.store(o_part_ptr + base + offs_m[:, None] * stride_om + offs_d[None, :], acc, mask=row_ok[:, None])
    ml_base = ((b * tl.num_programs(0) + kvh) * tl.num_programs(1) + split) * BLOCK_M
    tl.store(m_part_ptr + ml_base + offs_m, m_i, mask=row_ok)
    tl.store(l_part_ptr + ml_base + offs_m, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(
    o_part_ptr, m_part_ptr, l_part_ptr, out_ptr, lse_ptr, sinks_ptr, n_splits, n_kv_heads,
    stride_ob, stride_oh, stride_os, stride_om,
    stride_outb, stride_outh, stride_outt,
    Q_LEN: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    SPLITS_POW2: tl.constexpr, BLOCK_S: tl.constexpr, RECORD: tl.constexpr, SINKS: tl.constexpr,
):
    """Merge split partials of one query row: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s; with
    ``RECORD`` also the row's log2-sum-exp2 ``M + log2(L)`` into ``lse_ptr`` ``[B, Hkv, GROUP * Q_LEN]``.

    One program per (KV head, row, sequence), the splits read as vectors: a program looping over dozens of
    splits one at a time (GQA decodes use ~2 * SMs / Hkv of them) cost more than the attention itself.

    ``SINKS``: the row's query head has a sink logit ``sinks[head]`` (natural domain, not scaled or capped) that
    joins the denominator only: ``L += 2^(sink - M)`` with ``M`` the max over the splits and the sink. The
    recorded ``lse`` includes it, so recorded chunk masses are the probabilities the output used, and the sink's
    own mass is attributed to no chunk (a row then sums to ``1 - p_sink``, as transformers' probabilities do)."""
    kvh = tl.program_id(0)
    row = tl.program_id(1)
    b = tl.program_id(2)
    g = row // Q_LEN
    t = row % Q_LEN
    offs_s = tl.arange(0, SPLITS_POW2)
    s_ok = offs_s < n_splits
    ml = ((b * n_kv_heads + kvh) * n_splits + offs_s) * BLOCK_M + row
    m = tl.load(m_part_ptr + ml, mask=s_ok, other=float("-inf"))
    l_s = tl.load(l_part_ptr + ml, mask=s_ok, other=0.0)
    m_tot = tl.max(m, axis=0)
    if SINKS:
        sink = tl.load(sinks_ptr + kvh * GROUP + g).to(tl.float32) * 1.4426950408889634  # log2 domain
        m_tot = tl.maximum(m_tot, sink)
    m_safe = tl.where(m_tot == float("-inf"), 0.0, m_tot)
    w = tl.exp2(m - m_safe)  # splits that saw nothing: m = -inf, w = 0
    l_tot = tl.sum(w * l_s, axis=0)
    if SINKS:
        l_tot += tl.exp2(sink - m_safe)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_b = tl.arange(0, BLOCK_S)
    acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    base = o_part_ptr + b * stride_ob + kvh * stride_oh + row * stride_om
    for s0 in range(0, n_splits, BLOCK_S):
        sb = s0 + offs_b
        sb_ok = sb < n_splits
        m_b = tl.load(m_part_ptr + ((b * n_kv_heads + kvh) * n_splits + sb) * BLOCK_M + row, mask=sb_ok,
                      other=float("-inf"))
        o = tl.load(base + sb[:, None] * stride_os + offs_d[None, :], mask=sb_ok[:, None], other=0.0)
        acc += tl.sum(tl.exp2(m_b - m_safe)[:, None] * o, axis=0)
    out = acc / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(out_ptr + b * stride_outb + (kvh * GROUP + g) * stride_outh + t * stride_outt + offs_d,
             out.to(out_ptr.dtype.element_ty))
    if RECORD:
        tl.store(lse_ptr + (b * n_kv_heads + kvh) * (GROUP * Q_LEN) + row, m_safe + tl.log2(tl.where(l_tot > 0, l_tot, 1.0)))


@triton.jit
def _pool_record_kernel(
    rec_m_ptr, rec_l_ptr, lse_ptr, len_ptr, scores_ptr, n_rows, n_cap, weight,
    stride_rb, stride_rrow, stride_sb, stride_so,
    CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, Q_LEN: tl.constexpr,
    LAST_ONLY: tl.constexpr,
):
    """``scores[b, o, c] += weight * sum_rows l[row, c] * 2^(m[row, c] - lse[row])`` over the ``n_rows`` rows
    ``o * n_rows ..`` of output ``o`` (program axis 2: one output pooling every row of every KV head, or one per KV
    head, whose rows are consecutive), for the chunks ``c`` the rows could read (``c < ceil(len / CHUNK)``; entries
    past it were never written). One program per block of chunks and output, ``BLOCK_R`` rows at a time; the sum
    runs in a fixed order, so the result does not depend on the launch. ``LAST_ONLY``: only the rows of the last
    query (row ``r`` is query ``r % Q_LEN``)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    o = tl.program_id(2)
    rows_b = n_rows * tl.num_programs(2)  # query rows of a sequence, over all its KV heads
    offs = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    n_keys = tl.load(len_ptr + b)
    ok = offs < tl.cdiv(n_keys, CHUNK)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        r = o * n_rows + r0 + offs_r
        r_ok = r0 + offs_r < n_rows
        if LAST_ONLY:
            r_ok = r_ok & (r % Q_LEN == Q_LEN - 1)
        lse = tl.load(lse_ptr + b * rows_b + r, mask=r_ok, other=0.0)
        ptrs = b * stride_rb + r[:, None] * stride_rrow + offs[None, :]
        both = r_ok[:, None] & ok[None, :]
        m = tl.load(rec_m_ptr + ptrs, mask=both, other=0.0)
        l_c = tl.load(rec_l_ptr + ptrs, mask=both, other=0.0)
        # l = 0: a chunk this row never read, or one it could not see
        acc += tl.sum(tl.where(both & (l_c > 0), l_c * tl.exp2(m - lse[:, None]), 0.0), axis=0)
    in_cap = offs < n_cap
    out = scores_ptr + b * stride_sb + o * stride_so + offs
    prev = tl.load(out, mask=in_cap, other=0.0)
    tl.store(out, prev + weight * acc, mask=in_cap)
