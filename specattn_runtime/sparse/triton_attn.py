"""Host wrapper for the block-sparse verification kernel: check, size the split, launch, combine."""

from __future__ import annotations

import torch

CHUNKS_PER_ITER = 4  # 4 chunks of 16 keys: a 64-key tile per iteration


def mask_to_indices(chunk_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[..., C]`` -> (int32 ``[..., C]`` selected chunk ids first, in order; int32 ``[...]`` counts); no host
    sync."""
    idx = torch.sort((~chunk_mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return idx, chunk_mask.sum(-1, dtype=torch.int32)


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor | None,
                            count: torch.Tensor | None, *, chunk_size: int, scale: float | None = None,
                            num_splits: int | None = None, out: torch.Tensor | None = None,
                            page_table: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
                            record: torch.Tensor | None = None, record_weight: float | None = None,
                            record_last_query: bool = False, window: int | None = None,
                            softcap: float | None = None, sinks: torch.Tensor | None = None, ring: int = 0,
                            chunks_per_iter: int = CHUNKS_PER_ITER, num_warps: int = 4, num_stages: int = 2
                            ) -> torch.Tensor:
    """Block-sparse causal attention of ``q`` (the newest ``Tq`` positions) over the chunks ``idx[b, :count[b]]``.

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H, Tq, D]`` (fp16/bf16/fp32), ``D`` a power of two.
    k, v : torch.Tensor
        ``[B, Hkv, Tk, D]``, last dim contiguous (a transformers cache layer as is); or, with ``page_table``,
        page pools ``[n_pages, page_size, Hkv, D]`` (``page_size`` a multiple of ``chunk_size``).
    idx, count : torch.Tensor or None
        int32 ``[B, C]`` and ``[B]``: compacted selection (the selection kernel's output), or ``[B, Hkv, C]`` and
        ``[B, Hkv]``: one selection per KV head. ``None`` for both: dense, every chunk up to the key count.
    num_splits : int, optional
        Split-K factor; default fills the GPU with about two programs per multiprocessor.
    page_table : torch.Tensor, optional
        Paged cache: int32 ``[B, max_pages]``, the pool page of each sequence page.
    kv_lens : torch.Tensor, optional
        int ``[B]`` key count of each sequence, read on the device (the queries are each sequence's last ``Tq``
        positions). Required with ``page_table`` (ragged batches); with a contiguous ``k`` / ``v`` it lets ``Tk``
        be a preallocated capacity of which only the first ``kv_lens[b]`` positions are valid.
    record : torch.Tensor, optional
        float32 ``[B, >= ceil(Tk / chunk_size)]``: adds ``record_weight`` (default ``1 / H``) times each chunk's
        attention mass, summed over heads and queries, to this buffer (the head-averaged, chunk-pooled
        attention the draft records), computed inside the attention kernel. float32 ``[B, Hkv, >= ceil(Tk /
        chunk_size)]``: one row per KV head, summed over its group's query heads and the queries (``record_weight``
        default ``Hkv / H``: the group's mean), for per-KV-head selection. ``record_last_query``: the last
        query's rows only (a forward that also rewrites the previous position records the new token's row).
        The masses are the probabilities the output used (window, soft-cap and sinks included); a sink's own
        probability belongs to no chunk, so with ``sinks`` a query's masses sum to less than 1.
    window : int, optional
        Sliding window: key ``s`` is visible to the query at position ``t`` iff ``t - window < s <= t``. A selection
        is intersected with it: keys older than the first query's window are never loaded.
    softcap : float, optional
        Logit soft-capping: ``softcap * tanh(scale * q.k / softcap)`` before the mask and the softmax.
    sinks : torch.Tensor, optional
        float ``[H]``: one logit per query head that joins the softmax denominator only (GPT-OSS's ``s_aux``).
    ring : int
        0: position ``p`` is row ``p`` of the cache (or of the sequence's pages). Otherwise ``k`` / ``v`` are a
        sliding-window layer's ring of ``ring`` slots, position ``p`` at slot ``p % ring`` (the engines'
        window-sized caches): contiguous with ``Tk = ring``, or paged with a ``page_table`` of ``ring / page_size``
        ring pages per sequence. Needs ``kv_lens`` (the logical lengths) and ``window`` with ``ring >= window +
        Tq - 1``. Positions, selections and ``record`` stay logical: ``idx`` holds logical chunk ids and ``record``
        spans the logical chunks (``>= ceil(max(kv_lens) / chunk_size)``, not checked: the lengths live on the
        device).
    chunks_per_iter, num_warps, num_stages : int
        Launch settings (chunks gathered per key tile, warps, software-pipelining depth): the speed, never the
        result (``bench/kernels.py --sections decode`` sweeps them).

    Returns
    -------
    torch.Tensor
        ``[B, H, Tq, D]`` in ``q``'s dtype (written into ``out`` when given).
    """
    import triton

    from .kernel import _combine_kernel, _pool_record_kernel, _sparse_attn_split_kernel

    b, h, tq, d = q.shape
    paged = page_table is not None
    dense = idx is None
    if dense != (count is None):
        raise ValueError("pass both idx and count (a selection) or neither (dense attention)")
    if paged:
        page_size, hkv = k.shape[1], k.shape[2]
        kv_lens = _check_paged(b, k, v, page_table, kv_lens, chunk_size)
        tk = int(page_table.shape[1]) * page_size  # capacity; the kernel reads each sequence's own length
    else:
        hkv, tk, page_size = k.shape[1], k.shape[2], chunk_size
        if kv_lens is not None:
            kv_lens = _check_lens(b, kv_lens, k.device)
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({hkv})")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim {d} must be a power of two >= 16 for the Triton backend")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last dimension")
    group = h // hkv
    block_m = max(16, triton.next_power_of_2(group * tq))
    per_head = not dense and idx.ndim == 3
    if per_head and (idx.shape[:2] != (b, hkv) or count.shape != (b, hkv)):
        raise ValueError(f"a selection per KV head needs idx [B={b}, Hkv={hkv}, C] and count [{b}, {hkv}], got "
                         f"{tuple(idx.shape)} and {tuple(count.shape)}")
    cap = -(-tk // chunk_size) if dense else idx.shape[-1]
    window, softcap, sinks = _check_variant(window, softcap, sinks, h, q.device)
    ring = _check_ring(ring, kv_lens, window, tk, tq)
    if window is not None and dense:  # the chunks a windowed dense pass can visit: split over those, not the cache
        cap = min(cap, -(-(window + tq - 1) // chunk_size) + 1)
    if num_splits is None:
        n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        num_splits = max(1, min(-(-2 * n_sm // (b * hkv)), -(-cap // chunks_per_iter)))
    o_part = torch.empty(b, hkv, num_splits, block_m, d, dtype=torch.float32, device=q.device)
    m_part = torch.empty(b, hkv, num_splits, block_m, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    if out is None:
        out = torch.empty_like(q)
    rows = group * tq
    if record is not None:  # chunks the recording buffers index: logical ones (a ring's slots are not chunks)
        n_chunks = record.shape[-1] if ring else -(-tk // chunk_size)
        _check_record(record, b, hkv, n_chunks)
        # dense attention visits (and writes) every chunk up to the length; a selection, or a window (its dense
        # pass starts at the window's first chunk), leaves the others unwritten: they must read as zero mass
        new = torch.empty if dense and window is None else torch.zeros
        rec_m = new(b, hkv, rows, n_chunks, dtype=torch.float32, device=q.device)
        rec_l = new(b, hkv, rows, n_chunks, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, hkv, rows, dtype=torch.float32, device=q.device)
    else:
        rec_m = rec_l = lse = m_part  # placeholders, never touched
    sm_scale = scale if scale is not None else d ** -0.5
    # strides as (sequence or page, head, position): the paged pool is [page, position, head, D]
    k_strides = (k.stride(0), k.stride(2), k.stride(1)) if paged else (k.stride(0), k.stride(1), k.stride(2))
    v_strides = (v.stride(0), v.stride(2), v.stride(1)) if paged else (v.stride(0), v.stride(1), v.stride(2))
    ragged = kv_lens is not None
    any_int = kv_lens if ragged else (idx if not dense else page_table)  # not read unless PAGED / RAGGED / sparse
    if any_int is None:
        any_int = torch.zeros(1, dtype=torch.int32, device=q.device)
    table = page_table if paged else any_int
    _sparse_attn_split_kernel[(hkv, num_splits, b)](
        q, k, v, any_int if dense else idx, any_int if dense else count, o_part, m_part, l_part, table,
        kv_lens if ragged else any_int, rec_m, rec_l, sm_scale, tk, window or 0, softcap or 1.0, ring,
        table.stride(0), rec_m.stride(0) if record is not None else 0, rec_m.stride(1) if record is not None else 0,
        rec_m.stride(2) if record is not None else 0,
        q.stride(0), q.stride(1), q.stride(2), *k_strides, *v_strides, 0 if dense else idx.stride(0),
        idx.stride(1) if per_head else 0, 0 if dense else count.stride(0), count.stride(1) if per_head else 0,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        Q_LEN=tq, GROUP=group, HEAD_DIM=d, BLOCK_M=block_m, CHUNK=chunk_size, CHUNKS_PER_ITER=chunks_per_iter,
        PAGED=paged, PAGE=page_size, RAGGED=ragged, DENSE=dense, RECORD=record is not None,
        # float32 models get float32 products (not TF32): the engine must reproduce transformers' logits
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", WINDOW=window is not None,
        SOFTCAP=softcap is not None, RING=bool(ring), num_warps=num_warps, num_stages=num_stages,
    )
    _combine_kernel[(hkv, rows, b)](
        o_part, m_part, l_part, out, lse, sinks if sinks is not None else m_part, num_splits, hkv,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        Q_LEN=tq, GROUP=group, HEAD_DIM=d, BLOCK_M=block_m, SPLITS_POW2=triton.next_power_of_2(num_splits),
        BLOCK_S=16, RECORD=record is not None, SINKS=sinks is not None, num_warps=2,
    )
    if record is not None:
        lens = kv_lens if ragged else torch.full((b,), tk, dtype=torch.int32, device=q.device)
        heads = record.ndim == 3  # one row per KV head: each pools its own group's rows
        outputs, pooled_rows = (hkv, rows) if heads else (1, hkv * rows)
        weight = (outputs / h) if record_weight is None else float(record_weight)
        block_c = 128
        _pool_record_kernel[(triton.cdiv(record.shape[-1], block_c), b, outputs)](
            rec_m, rec_l, lse, lens, record, pooled_rows, record.shape[-1], weight,
            rec_m.stride(0), rec_m.stride(2), record.stride(0), record.stride(1) if heads else 0, CHUNK=chunk_size,
            BLOCK_C=block_c, BLOCK_R=min(32, triton.next_power_of_2(pooled_rows)), Q_LEN=tq,
            LAST_ONLY=bool(record_last_query), num_warps=4,
        )
    return out


def _check_variant(window, softcap, sinks, h: int, device: torch.device):
    """``(window, softcap, sinks)`` validated: window an int >= 1, softcap a float > 0, sinks ``[H]`` on the
    queries' device (any float dtype: the kernel reads it as float32, so a model's parameter goes in as is)."""
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive int (keys visible within it), got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (None for no soft-capping), got {softcap!r}")
    if sinks is not None:
        if sinks.shape != (h,):
            raise ValueError(f"sinks must be one logit per query head, [H={h}], got {tuple(sinks.shape)}")
        if sinks.device != device or not sinks.is_floating_point():
            raise ValueError(f"sinks must be a float tensor on {device}, got {sinks.dtype} on {sinks.device}")
        sinks = sinks.contiguous()
    return (None if window is None else int(window)), (None if softcap is None else float(softcap)), sinks


def _check_ring(ring: int, kv_lens, window: int | None, tk: int, tq: int) -> int:
    """A ring cache (``ring`` > 0) holds ``tk`` slots (its buffer's, or its page table's), read with device lengths
    within a window that fits it (the queries' oldest visible key not yet overwritten); returns ``ring``."""
    if not ring:
        return 0
    if kv_lens is None:
        raise ValueError("a ring cache needs kv_lens: its slot count is not the key count")
    from .reference import _check_ring as check_fits

    check_fits(ring, tk, window, tq)
    return int(ring)


def _check_record(record: torch.Tensor, b: int, hkv: int, n_chunks: int) -> None:
    """A recording buffer is ``[B, >= n_chunks]`` (head-averaged) or ``[B, Hkv, >= n_chunks]`` (per KV head)."""
    shape_ok = (record.ndim == 2 and record.shape[0] == b) or (record.ndim == 3 and record.shape[:2] == (b, hkv))
    if record.dtype != torch.float32 or not shape_ok or record.shape[-1] < n_chunks or record.stride(-1) != 1:
        raise ValueError(f"record must be float32 [B={b}, >= {n_chunks}] or [B={b}, Hkv={hkv}, >= {n_chunks}] with "
                         f"contiguous rows, got {record.dtype} {tuple(record.shape)}")


def _check_lens(b: int, kv_lens: torch.Tensor, device: torch.device) -> torch.Tensor:
    if kv_lens.shape != (b,) or kv_lens.dtype != torch.int32 or kv_lens.device != device:
        raise ValueError(f"kv_lens must be int32 [B={b}] on {device}, got {kv_lens.dtype} {tuple(kv_lens.shape)} "
                         f"on {kv_lens.device}")
    return kv_lens


def _check_paged(b: int, k: torch.Tensor, v: torch.Tensor, page_table: torch.Tensor, kv_lens: torch.Tensor | None,
                 chunk_size: int) -> torch.Tensor:
    """Validate a paged cache; returns ``kv_lens`` as int32 on the cache's device."""
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"paged k and v must both be [n_pages, page_size, Hkv, D], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    page_size = k.shape[1]
    if page_size % chunk_size:
        raise ValueError(f"page_size {page_size} must be a multiple of chunk_size {chunk_size}")
    if page_table.ndim != 2 or page_table.shape[0] != b or page_table.dtype != torch.int32:
        raise ValueError(f"page_table must be int32 [B={b}, max_pages], got {page_table.dtype} "
                         f"{tuple(page_table.shape)}")
    if kv_lens is None or kv_lens.shape != (b,):
        raise ValueError(f"a paged cache needs kv_lens [B={b}] (each sequence's key count)")
    return kv_lens.to(device=k.device, dtype=torch.int32).contiguous()
