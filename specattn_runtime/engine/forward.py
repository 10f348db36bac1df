"""One model forward inside the decode engine: attention reads everything that changes from device memory.

The engine calls an unmodified transformers model with ``use_cache=False``, explicit ``position_ids`` and the
keyword ``specattn_engine=True``. The registered ``"specattn"`` attention function (``hooks.py``) then hands the
new tokens' (post-RoPE) query, key and value to one custom op, ``specattn::engine_attention``, which:

1. writes the new keys and values into the engine's preallocated cache at ``write_pos`` (a device tensor; a
   sliding-window layer's ring at ``write_pos % ring``, ``ForwardContext.ring``);
2. attends over the first ``kv_len`` positions (a device tensor) densely, or over the chunks the selection kernel
   left in ``idx[:count]`` (device tensors; one list per layer, or one per KV head), and, on recording layers,
   adds the chunk-pooled attention mass to a score row (or one row per KV head) inside the attention kernel.

The layer's attention variant travels as the op's own arguments, read from transformers' keywords by the
attention function: ``window`` (sliding window, 0 = none; keys older than ``position - window + 1`` are never
read, a sparse layer's selection is intersected with it), ``softcap`` (0 = none) and ``sinks`` (float ``[H]`` or
None). They are per layer and fixed for a model (ints, floats, a parameter tensor), so a compiled forward bakes
them in and the context stays per forward.

Everything else the op needs besides q/k/v comes from the :class:`ForwardContext` the engine activates around the
call, not from the op's arguments: the compiled forward is then independent of the cache capacity and of the
context length, one CUDA graph serves every step, and ``torch.compile`` sees an opaque op (it fuses the rest of
the layer around it). This is the pattern vLLM uses for its attention op.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..selection.triton_select import indices_to_mask
from ..sparse.reference import attention_with_lengths_reference


@dataclass
class ForwardContext:
    """The device buffers one forward of one model reads and writes (shapes for batch 1)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K and V [1, Hkv, capacity or ring, D]
    write_pos: torch.Tensor  # int64 [Tq]: cache positions of the forward's tokens
    kv_len: torch.Tensor  # int32 [1]: keys visible to the last query (= write_pos[-1] + 1)
    chunk_size: int
    backend: str  # "triton" | "torch"
    # layer -> (idx [1, C], count [1]): one selection for the layer; or (idx [1, Hkv, C], count [1, Hkv]): per KV head
    sparse: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # layer -> float32 score rows (+=): [1, C] head-averaged, or [1, Hkv, C] per KV head (its query heads averaged)
    record: dict[int, torch.Tensor] = field(default_factory=dict)
    record_last_query: bool = False  # record the last query's attention only
    launch: dict = field(default_factory=dict)  # Triton launch settings (num_warps, num_stages, ...): speed only
    # Paged pool (the batched engine): ``kv`` holds pools [n_pages, page_size, Hkv, D], ``write_pos`` the flat pool
    # rows [B * Tq] of the new tokens (sequence-major), ``kv_len`` int32 [B] and this int32 [B, max_pages].
    page_table: torch.Tensor | None = None
    # Per layer: the slots of its ring (a sliding-window layer's window-sized cache, KVStore.ring / PagedKVPool.ring;
    # position p at slot p % ring), 0 = a full-length cache. Empty: no rings.
    ring: list[int] = field(default_factory=list)
    # Paged rings: the sequences' ring pages int32 [B, ring / page_size] and the flat ring-pool rows [B * Tq] of the
    # new tokens (ring layers read and write these instead of page_table / write_pos).
    ring_table: torch.Tensor | None = None
    ring_write_pos: torch.Tensor | None = None


_ACTIVE: list[ForwardContext] = []


@contextmanager
def active(ctx: ForwardContext):
    """Make ``ctx`` the context ``engine_attention`` reads during the enclosed forward."""
    _ACTIVE.append(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.pop()


@torch.library.custom_op("specattn::engine_attention", mutates_args=())
def engine_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float,
                     window: int = 0, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """query ``[1, H, Tq, D]``, key/value ``[1, Hkv, Tq, D]`` (new tokens) -> ``[1, Tq, H, D]``; ``window`` /
    ``softcap`` 0 mean none (the schema takes plain ints and floats), ``sinks`` float ``[H]`` or None.

    Writes the cache in place and reads the active context: both invisible to the compiler by design (see the
    module docstring), which is safe because every forward consumes the op's output.
    """
    if not _ACTIVE:
        raise RuntimeError("engine_attention runs only inside a decode-engine forward (no active ForwardContext)")
    ctx = _ACTIVE[-1]
    variant = dict(window=window or None, softcap=softcap or None, sinks=sinks)
    ring = ctx.ring[layer] if ctx.ring else 0
    if ctx.page_table is not None:
        return _paged_attention(ctx, query, key, value, layer, scale, variant, ring)
    k_cache, v_cache = ctx.kv[layer]
    slots = torch.remainder(ctx.write_pos, ring) if ring else ctx.write_pos  # positions stay logical elsewhere
    k_cache.index_copy_(2, slots, key)
    v_cache.index_copy_(2, slots, value)
    sel, rec = ctx.sparse.get(layer), ctx.record.get(layer)
    if ctx.backend == "triton":
        from ..sparse.triton_attn import sparse_attention_triton

        idx, count = sel if sel is not None else (None, None)
        out = sparse_attention_triton(query, k_cache, v_cache, idx, count, chunk_size=ctx.chunk_size, scale=scale,
                                      kv_lens=ctx.kv_len, record=rec, record_last_query=ctx.record_last_query,
                                      ring=ring, **variant, **ctx.launch)
    else:
        mask = indices_to_mask(*sel, n_chunks=sel[0].shape[-1]) if sel is not None else None
        out = attention_with_lengths_reference(query, k_cache, v_cache, ctx.kv_len, mask,
                                               chunk_size=ctx.chunk_size, scale=scale, record=rec,
                                               record_last_query=ctx.record_last_query, ring=ring, **variant)
    return out.transpose(1, 2).contiguous()


def _paged_attention(ctx: ForwardContext, query, key, value, layer: int, scale: float, variant: dict,
                     ring: int) -> torch.Tensor:
    """``engine_attention`` over a paged pool: B sequences of ragged lengths, each through its page table (a window
    layer with a ring: through its ring pages)."""
    k_pool, v_pool = ctx.kv[layer]
    table, write = (ctx.ring_table, ctx.ring_write_pos) if ring else (ctx.page_table, ctx.write_pos)
    b, hkv, tq, d = key.shape
    flat = (-1, hkv, d)  # pool rows: [n_pages * page_size, Hkv, D]
    k_pool.view(flat).index_copy_(0, write, key.transpose(1, 2).reshape(b * tq, hkv, d))
    v_pool.view(flat).index_copy_(0, write, value.transpose(1, 2).reshape(b * tq, hkv, d))
    sel, rec = ctx.sparse.get(layer), ctx.record.get(layer)
    if ctx.backend == "triton":
        from ..sparse.triton_attn import sparse_attention_triton

        idx, count = sel if sel is not None else (None, None)
        out = sparse_attention_triton(query, k_pool, v_pool, idx, count, chunk_size=ctx.chunk_size, scale=scale,
                                      page_table=table, kv_lens=ctx.kv_len, record=rec,
                                      record_last_query=ctx.record_last_query, ring=ring, **variant, **ctx.launch)
    else:  # the reference: every sequence's pages gathered to its full page-table capacity (static shapes)
        page = k_pool.shape[1]
        rows = (table.long()[:, :, None] * page + torch.arange(page, device=key.device)).flatten(1)
        k_all = k_pool.view(flat)[rows].transpose(1, 2)  # [B, Hkv, pages * page_size, D]
        v_all = v_pool.view(flat)[rows].transpose(1, 2)
        mask = indices_to_mask(*sel, n_chunks=sel[0].shape[-1]) if sel is not None else None
        out = attention_with_lengths_reference(query, k_all, v_all, ctx.kv_len, mask, chunk_size=ctx.chunk_size,
                                               scale=scale, record=rec, record_last_query=ctx.record_last_query,
                                               ring=ring, **variant)
    return out.transpose(1, 2).contiguous()


@engine_attention.register_fake
def _(query, key, value, layer, scale, window=0, softcap=0.0, sinks=None):
    b, h, t, _ = query.shape
    return query.new_empty(b, t, h, value.shape[-1])


class CompiledPerShape:
    """``torch.compile`` of ``fn(ids, positions)`` once per input shape, each on a code object of its own.

    Dynamo keeps a function's compiled graphs on its code object, and with ``fullgraph=True`` it fails hard
    (``FailOnRecompileLimitHit``) once that code object holds ``recompile_limit`` (8) of them. One shared code
    object would hold one graph per (model, batch bucket, query length) of the whole process: a draft and a target
    over three batch buckets already pass 8. A copy of the code per shape keeps each at one graph, without
    touching dynamo's process-wide settings. Called only while a phase is captured (or on the eager CPU path).
    """

    def __init__(self, fn, **compile_kwargs):
        self.fn, self.compile_kwargs, self.by_shape = fn, compile_kwargs, {}

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        key = tuple(ids.shape)
        compiled = self.by_shape.get(key)
        if compiled is None:
            fn = self.fn
            own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                                     fn.__closure__)
            compiled = self.by_shape[key] = torch.compile(own, **self.compile_kwargs)
        return compiled(ids, positions)


def make_forward(model, compile: bool = False):
    """``forward(ids int64 [B, Tq], positions int64 [B, Tq]) -> logits [B, Tq, V]`` through the engine's attention.

    With ``compile``, ``torch.compile`` (inductor, no CUDA graphs of its own: the engine captures whole phases)
    fuses the layer's small operations (norms, rotary, activations), which would otherwise be a few hundred tiny
    kernels per forward. It compiles once per input shape (:class:`CompiledPerShape`); the context length never
    enters the graph.
    """
    def forward(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, position_ids=positions, use_cache=False, specattn_engine=True).logits

    if not compile:
        return forward
    # Coordinate-descent tuning makes inductor rewrite each one-token linear layer (a matrix-vector product) as a
    # tuned Triton reduction instead of a cuBLAS call: profiled on an H200, cuBLAS ran a 1.1B draft's 2048-wide
    # matrix-vector products at ~40% of copy bandwidth, ~55% of the draft phase (bench/RESULTS.md). The option is
    # this compile's own: other torch.compile calls in the process keep their settings. It costs compile time.
    options = {"coordinate_descent_tuning": True} if next(model.parameters()).is_cuda else None
    return CompiledPerShape(forward, fullgraph=True, dynamic=False, options=options)
