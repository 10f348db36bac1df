"""Window-sized KV caches for sliding-window layers (issue 25): a local layer keeps its last ``R`` positions in a ring
(position ``p`` at slot ``p % R``), ``R`` = the window + the most tokens one engine forward writes.

Kernels: the Triton kernel and the torch reference read a ring exactly as a full-length cache holding the same
logical keys (dense with device lengths, a shared or per-KV-head chunk list, fused recording), with the window's
first key at a chunk edge and inside a chunk. Slots the kernel must not read (older than every query's window,
never written) hold NaN for the kernel, and finite garbage for the references (SDPA turns a masked NaN value into
NaN, so there a wrong read shows as a mismatch with the full-length reference instead).

Engine: on random-weight Gemma 2 / Gemma 3 / Mistral / Qwen2-with-window-layers (tests/test_variants.py's
instances with their windows of 16-24 keys), the CPU engine over ring caches equals the eager loop token for token
on prompts and generations past the window and past the ring, greedy and seeded, k 1 and 4, and a second call
reusing the prompt prefix; the store allocates ring-size buffers for local layers and full ones for the others.

Batched engine: the paged pool keeps a ring of ring pages per running sequence for window layers (the kernel reads
them through a ring-page table); ``generate_batch`` over rings equals the eager loop per prompt, with every chunk
transformers' greedy; ring pages are taken at admission, waited for when none are free, and all returned; the
budget counts the rings first.
"""

import dataclasses
import os

import pytest
import torch

from specattn_runtime.sparse import attention_with_lengths_reference
from specattn_runtime.sparse.reference import slot_positions
from specattn_runtime.sparse.triton_attn import mask_to_indices, sparse_attention_triton
from test_kernel_variants import CHUNK, DEVICE, DTYPE, close, inputs, random_selection, window_at

needs_triton = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton kernels on CPU tensors need the interpreter (TRITON_INTERPRET=1)")


# -- kernels ---------------------------------------------------------------------------------------------------------


def to_ring(full: torch.Tensor, lens: list[int], tq: int, window: int, ring: int, fill: str) -> torch.Tensor:
    """``full`` ``[B, Hkv, cap, D]`` (logical positions) as a ring ``[B, Hkv, ring, D]`` at each sequence's length:
    slots holding a position some query can see get its key; the others (older than the first query's window,
    never written) get NaN (``fill="nan"``) or finite garbage (``"garbage"``)."""
    lens_t = torch.tensor(lens)
    pos = slot_positions(lens_t, ring, ring)  # [B, ring]
    lo = (lens_t - tq).clamp_min(0)[:, None] - window + 1
    ok = (pos >= 0) & (pos >= lo)  # [B, ring]
    gathered = torch.stack([full[bi][:, pos[bi].clamp_min(0)] for bi in range(full.shape[0])])
    bad = torch.full_like(gathered, float("nan")) if fill == "nan" else torch.randn_like(gathered) * 50
    return torch.where(ok[:, None, :, None], gathered, bad)


RING_CASES = [  # b, h, hkv, tq, cap (logical), d, lens, window position, ring slots beyond window + tq - 1
    (1, 4, 2, 1, 150, 16, [137], "edge", 0),
    (2, 6, 3, 3, 130, 32, [57, 129], "inside", 5),  # ring not a multiple of the chunk: still exact
    (1, 4, 1, 5, 100, 64, [100], "inside", 16),
    (2, 4, 2, 4, 160, 32, [21, 150], "edge", 9),  # the short sequence has not filled the ring yet
]


@pytest.mark.parametrize("b,h,hkv,tq,cap,d,lens,where,extra", RING_CASES)
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_reference_over_a_ring_equals_the_full_cache(b, h, hkv, tq, cap, d, lens, where, extra, softcap, gen):
    """float64: dense, per-KV-head selection with recording, head-averaged recording of the last query."""
    q, k, v, _ = (x.double() if x is not None else None for x in inputs(b, h, hkv, tq, cap, d, gen, False))
    window = window_at(lens[-1], tq, where)
    ring = window + tq - 1 + extra
    lens_t = torch.tensor(lens, dtype=torch.int32)
    kr, vr = (to_ring(x, lens, tq, window, ring, "garbage") for x in (k, v))
    n_chunks = -(-cap // CHUNK)
    for sel, rec_shape, last in ((None, (b, n_chunks), False),
                                 (random_selection(b, hkv, cap, lens, tq, gen, per_head=True), (b, hkv, n_chunks),
                                  False),
                                 (random_selection(b, hkv, cap, lens, tq, gen, per_head=False), (b, n_chunks), True)):
        rec_full = torch.rand(rec_shape, generator=gen, dtype=torch.float64)
        rec_ring = rec_full.clone()
        kw = dict(chunk_size=CHUNK, window=window, softcap=softcap, record_last_query=last)
        want = attention_with_lengths_reference(q, k, v, lens_t, sel, record=rec_full, **kw)
        got = attention_with_lengths_reference(q, kr, vr, lens_t, sel, record=rec_ring, ring=ring, **kw)
        what = "dense" if sel is None else f"selection {tuple(sel.shape)}"
        close(got, want, what, torch.float64)
        close(rec_ring, rec_full, f"{what}: recorded mass", torch.float64)


@needs_triton
@pytest.mark.parametrize("b,h,hkv,tq,cap,d,lens,where,extra", RING_CASES)
def test_kernel_over_a_ring_equals_the_reference(b, h, hkv, tq, cap, d, lens, where, extra, gen):
    """Dense with head-averaged recording, a shared chunk list with per-KV-head recording of the last query, a
    per-KV-head chunk list: the kernel over a NaN-poisoned ring against the full-length reference."""
    q, k, v, sinks = inputs(b, h, hkv, tq, cap, d, gen, sink=b == 1)
    q, k, v = q.to(DEVICE, DTYPE), k.to(DEVICE, DTYPE), v.to(DEVICE, DTYPE)
    sinks = sinks.to(DEVICE) if sinks is not None else None
    window = window_at(lens[-1], tq, where)
    ring = window + tq - 1 + extra
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kr, vr = (to_ring(x.cpu(), lens, tq, window, ring, "nan").to(DEVICE) for x in (k, v))
    n_chunks = -(-cap // CHUNK)
    runs = [("dense", None, torch.rand(b, n_chunks, generator=gen), False),
            ("shared", random_selection(b, hkv, cap, lens, tq, gen, per_head=False),
             torch.rand(b, hkv, n_chunks, generator=gen), True),
            ("per-head", random_selection(b, hkv, cap, lens, tq, gen, per_head=True), None, False)]
    for name, sel, base, last in runs:
        rec = None if base is None else base.to(DEVICE)
        want_rec = None if base is None else base.clone().to(DEVICE)
        idx, count = (None, None) if sel is None else mask_to_indices(sel.to(DEVICE))
        out = torch.full_like(q, float("nan"))
        got = sparse_attention_triton(q, kr, vr, idx, count, chunk_size=CHUNK, kv_lens=lens_t, record=rec,
                                      record_last_query=last, out=out, window=window, sinks=sinks, ring=ring)
        want = attention_with_lengths_reference(q.double(), k.double(), v.double(), lens_t,
                                                None if sel is None else sel.to(DEVICE), chunk_size=CHUNK,
                                                record=want_rec, record_last_query=last, window=window,
                                                sinks=None if sinks is None else sinks.double())
        close(got, want, f"ring {name}")
        if rec is not None:
            close(rec, want_rec, f"ring {name}: recorded mass")


@needs_triton
@pytest.mark.parametrize("b,h,hkv,tq,cap,d,lens,where,extra", RING_CASES)
def test_paged_ring_kernel_equals_the_reference(b, h, hkv, tq, cap, d, lens, where, extra, gen):
    """The batched engine's layout: each sequence's ring in ring pages scattered over a NaN-poisoned pool, read
    through a ring-page table (dense and a per-KV-head chunk list with recording), against the full-length
    reference."""
    q, k, v, _ = inputs(b, h, hkv, tq, cap, d, gen, sink=False)
    q = q.to(DEVICE, DTYPE)
    window = window_at(lens[-1], tq, where)
    ring = -(-(window + tq - 1 + extra) // CHUNK) * CHUNK  # whole pages
    per_seq = ring // CHUNK
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    table = (torch.randperm(b * per_seq, generator=gen) + 1).view(b, per_seq).to(torch.int32)  # page 0: scratch
    pools = []
    for x in (k, v):
        rings = to_ring(x, lens, tq, window, ring, "nan")  # [B, Hkv, ring, D]
        pool = torch.full((b * per_seq + 1, CHUNK, hkv, d), float("nan"))
        pool[table.long().flatten()] = rings.view(b, hkv, per_seq, CHUNK, d).permute(0, 2, 3, 1, 4).flatten(0, 1)
        pools.append(pool.to(DEVICE, DTYPE))
    table = table.to(DEVICE)
    n_chunks = -(-cap // CHUNK)
    for name, sel, base in (("dense", None, None),
                            ("per-head", random_selection(b, hkv, cap, lens, tq, gen, per_head=True),
                             torch.rand(b, hkv, n_chunks, generator=gen))):
        rec = None if base is None else base.to(DEVICE)
        want_rec = None if base is None else base.clone().to(DEVICE)
        idx, count = (None, None) if sel is None else mask_to_indices(sel.to(DEVICE))
        got = sparse_attention_triton(q, *pools, idx, count, chunk_size=CHUNK, page_table=table, kv_lens=lens_t,
                                      record=rec, window=window, ring=ring)
        want = attention_with_lengths_reference(q.double(), k.to(DEVICE).double(), v.to(DEVICE).double(), lens_t,
                                                None if sel is None else sel.to(DEVICE), chunk_size=CHUNK,
                                                record=want_rec, window=window)
        close(got, want, f"paged ring {name}")
        if rec is not None:
            close(rec, want_rec, f"paged ring {name}: recorded mass")


def test_ring_arguments_are_checked():
    q, k = torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 32, 16)
    lens = torch.tensor([40], dtype=torch.int32)
    with pytest.raises(ValueError, match="needs a window with ring >= window"):
        attention_with_lengths_reference(q, k, k, lens, chunk_size=CHUNK, window=32, ring=32)
    with pytest.raises(ValueError, match="must be the cache's slot count"):
        attention_with_lengths_reference(q, k, k, lens, chunk_size=CHUNK, window=8, ring=48)
    with pytest.raises(ValueError, match="needs kv_lens"):
        sparse_attention_triton(q, k, k, None, None, chunk_size=CHUNK, window=8, ring=32)
    pool, table = torch.zeros(4, 16, 2, 16), torch.zeros(1, 2, dtype=torch.int32)  # a ring table of 2 pages
    with pytest.raises(ValueError, match="must be the cache's slot count"):
        sparse_attention_triton(q, pool, pool, None, None, chunk_size=CHUNK, page_table=table, kv_lens=lens,
                                window=8, ring=48)


# -- the store and the engine ----------------------------------------------------------------------------------------

RING_ARCHS = ["gemma2-softcap-d256", "gemma3-1kv", "mistral-window-1kv", "qwen2-window-layers"]
PROMPT = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(5)).tolist()  # > every ring (80-96)


def engine_models(arch: str):
    from test_engine_variants import models

    return models(arch)


@pytest.mark.parametrize("arch", RING_ARCHS + ["gpt_oss-sinks"])
@torch.no_grad()
def test_store_allocates_rings_and_prefill_fills_them_exactly(arch):
    """Local layers get ``R = round_up(W + MAX_FORWARD_TOKENS, 16)`` slots, global ones the capacity; a prefill in
    pieces shorter than the ring (the retained ``W - 1`` keys and the sliding mask at every piece boundary) leaves
    in each slot the key a full-length store holds at that slot's position."""
    from specattn_runtime.engine import KVStore
    from specattn_runtime.engine.ring import MAX_FORWARD_TOKENS
    from specattn_runtime.variants import layer_windows

    _, target = engine_models(arch)
    cap = 2048
    rings, full = KVStore({"target": target}, cap), KVStore({"target": target}, cap, rings=False)
    windows = layer_windows(target.config)
    assert any(windows)
    for j, w in enumerate(windows):
        want = -(-(w + MAX_FORWARD_TOKENS) // 16) * 16 if w else 0
        assert rings.ring["target"][j] == want
        assert rings.kv["target"][j][0].shape[2] == (want or cap) and full.kv["target"][j][0].shape[2] == cap
    assert rings.nbytes() < full.nbytes() == full.nbytes_full() == rings.nbytes_full()
    rings.prefill("target", PROMPT, chunk=37)
    full.prefill("target", PROMPT)
    n = len(PROMPT)
    for j, r in enumerate(rings.ring["target"]):
        pos = slot_positions(torch.tensor([n]), r, r)[0] if r else torch.arange(n)
        held = pos[pos >= 0]
        for got, want in zip(rings.kv["target"][j], full.kv["target"][j]):
            got = got[:, :, : len(pos)][:, :, pos >= 0]
            torch.testing.assert_close(got, want[:, :, held], rtol=1e-4, atol=1e-5, msg=f"layer {j}")


@pytest.mark.parametrize("arch", RING_ARCHS)
@pytest.mark.parametrize("k,temperature", [(1, 0.0), (4, 0.0), (4, 0.8)])
@torch.no_grad()
def test_engine_over_rings_equals_eager_loop(arch, k, temperature):
    """A 150-token prompt (longer than every ring) and 40 tokens: the engine over rings equals the eager loop's
    full-length transformers cache token for token, with the same acceptance per step."""
    from specattn_runtime import SpecAttnRuntime
    from test_engine_variants import artifact, same_run

    draft, target = engine_models(arch)
    art = artifact(0.6)
    eager = SpecAttnRuntime(art, draft, target, engine="eager", exact_dense_shortcut=False)
    static = SpecAttnRuntime(art, draft, target, engine="static", exact_dense_shortcut=False)
    kw = dict(k=k, temperature=temperature, top_p=0.9, seed=7, eos_token_id=None)
    b = static.generate(PROMPT, 40, **kw)
    store = static._caches.store
    assert store.has_rings and all(store.kv[role][j][0].shape[2] == (r or store.capacity)
                                   for role in store.ring for j, r in enumerate(store.ring[role]))
    same_run(arch, eager.generate(PROMPT, 40, **kw), b)
    assert b.stats.accepted_hist[0] > 0  # rejections: rollback across the ring's wrap is exercised


@pytest.mark.parametrize("arch", ["gemma3-1kv", "qwen2-window-layers"])
@torch.no_grad()
def test_prefix_reuse_over_rings(arch):
    """After a generation has overwritten the rings: a prompt extending the last one reuses it (its snapshot is
    restored), so does a prompt diverging just before its end; one diverging earlier than the rings reach is
    recomputed from position 0. Every continuation equals the eager loop."""
    from specattn_runtime import SpecAttnRuntime
    from test_engine_variants import artifact, same_run

    draft, target = engine_models(arch)
    art = artifact(0.6)
    eager = SpecAttnRuntime(art, draft, target, engine="eager", exact_dense_shortcut=False)
    static = SpecAttnRuntime(art, draft, target, engine="static", exact_dense_shortcut=False)
    kw = dict(k=4, temperature=0.0, eos_token_id=None)
    first = static.generate(PROMPT, 40, **kw)
    store = static._caches.store
    longer = PROMPT + first.tokens + [7, 8, 9]
    assert store.prefill("target", longer[:-1]) == store.prefill("draft", longer[:-1]) == len(PROMPT) - 1
    near = PROMPT[:140] + [1, 2, 3]  # diverges 9 positions before the cached end: within every ring's snapshot
    far = PROMPT[:40] + [1, 2, 3]  # diverges before the snapshot's run: recomputed
    for prompt, reused in ((longer, len(longer) - 1), (near, 140), (far, 0)):
        if prompt is not longer:
            assert store.prefill("target", prompt[:-1]) == reused
        same_run(arch, eager.generate(prompt, 40, **kw), static.generate(prompt, 40, **kw))
        assert static._caches.store is store


@pytest.mark.parametrize("arch", ["gemma2-softcap-d256", "mistral-window-1kv"])
@torch.no_grad()
def test_self_speculation_and_plain_decoding_over_rings_are_lossless(arch):
    """SelfSpecEngine (sparse drafts at p = 0.3 inside each window, dense recording verification) and k = 0 over
    rings, past a prompt longer than the ring: transformers' own greedy tokens; seeded sampling equals the eager
    self-speculation loop."""
    from specattn_runtime import SpecAttnRuntime
    from test_engine_variants import artifact, transformers_greedy

    _, target = engine_models(arch)
    ref = transformers_greedy(arch, PROMPT, 30)
    rt = SpecAttnRuntime(artifact(0.3, "self"), None, target, engine="static", exact_dense_shortcut=False)
    assert rt.generate(PROMPT, 30, k=4, eos_token_id=None).tokens == ref
    assert rt._caches.store.has_rings
    assert rt.generate(PROMPT, 30, k=0, eos_token_id=None).tokens == ref
    art = artifact(1.0, "self")
    kw = dict(k=3, temperature=0.8, seed=3, eos_token_id=None)
    a = SpecAttnRuntime(art, None, target, engine="eager", exact_dense_shortcut=False).generate(PROMPT, 30, **kw)
    b = SpecAttnRuntime(art, None, target, engine="static", exact_dense_shortcut=False).generate(PROMPT, 30, **kw)
    assert a.tokens == b.tokens and a.stats.accepted_hist == b.stats.accepted_hist


@pytest.mark.slow  # a model through the Triton interpreter
@needs_triton
@pytest.mark.parametrize("arch", ["mistral-window-1kv"])  # soft-capping and head_dim 256: the batched Triton test
@torch.no_grad()
def test_engine_over_rings_through_triton_kernels(arch):
    """The kernels inside the engine over rings (dense decode, recording, top-p selection, sparse verification):
    transformers' greedy tokens with every chunk read, and the eager loop's at p = 0.6."""
    from specattn_runtime import SpecAttnRuntime
    from test_engine_variants import artifact, same_run, transformers_greedy

    draft, target = engine_models(arch)
    kw = dict(backend="triton", selection="triton", exact_dense_shortcut=False)
    rt = SpecAttnRuntime(artifact(1.0), draft, target, engine="static", **kw)
    assert rt.generate(PROMPT, 12, k=3, eos_token_id=None).tokens == transformers_greedy(arch, PROMPT, 12)
    assert rt._caches.store.has_rings
    art = artifact(0.6)
    a = SpecAttnRuntime(art, draft, target, engine="eager", **kw).generate(PROMPT, 12, k=3, eos_token_id=None)
    b = SpecAttnRuntime(art, draft, target, engine="static", **kw).generate(PROMPT, 12, k=3, eos_token_id=None)
    same_run(arch, a, b)


def test_short_context_keeps_plain_caches_and_k_is_bounded():
    """A capacity the ring would not undercut allocates full-length buffers; k + 1 above what the rings keep room
    for is refused by the engine with the fix in the message."""
    from specattn_runtime.engine import DecodeEngine, KVStore, SparsePlan, make_forward

    _, target = engine_models("gemma3-1kv")
    assert not KVStore({"target": target}, 80).has_rings
    store = KVStore({"target": target}, 512, max_forward_tokens=4)
    assert store.has_rings and max(store.ring["target"]) == 32  # 16 + 4 rounded up to the chunk
    with pytest.raises(ValueError, match="max_forward_tokens"):
        DecodeEngine(target, store, SparsePlan(), 4, {"target": make_forward(target)}, backend="torch")


# -- the batched engine: ring pages in the paged pool ----------------------------------------------------------------

BATCH_PROMPTS = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist()
                 for n in (150, 110, 190)]  # ragged, each past every ring (80-96 slots)


@pytest.mark.parametrize("arch,k,temperature", [("gemma3-1kv", 4, 0.0), ("qwen2-window-layers", 4, 0.0),
                                                ("mistral-window-1kv", 1, 0.8)])
@torch.no_grad()
def test_batched_engine_over_ring_pages_equals_eager_loop(arch, k, temperature):
    """Three ragged prompts in one batch: each sequence's tokens and acceptance equal the eager loop's alone; the
    window layers' pools hold rings of ring pages (one set per slot, not per position), and every page and ring
    page is free afterwards."""
    from specattn_runtime import SpecAttnRuntime
    from specattn_runtime.variants import layer_windows
    from test_engine_variants import artifact

    draft, target = engine_models(arch)
    art = artifact(0.6)
    eager = SpecAttnRuntime(art, draft, target, engine="eager", exact_dense_shortcut=False)
    static = SpecAttnRuntime(art, draft, target, engine="static", exact_dense_shortcut=False)
    kw = dict(k=k, temperature=temperature, top_p=0.9, seed=11, eos_token_id=None)
    outs = static.generate_batch(BATCH_PROMPTS, 40, **kw)
    pool = static._pool
    assert pool.ring_slots and pool.ring_sequences == 4  # the bucket of 3 sequences
    for role in pool.kv:
        for j, w in enumerate(layer_windows(pool.models[role].config)):
            pages = pool.kv[role][j][0].shape[0]
            assert pages == (pool.ring_allocator.n_pages if w else pool.n_pages), (role, j)
    assert pool.ring_allocator.n_pages == 1 + 4 * pool.ring_slots // pool.page_size < pool.n_pages
    for prompt, got in zip(BATCH_PROMPTS, outs):
        want = eager.generate(prompt, 40, **kw)
        assert got.tokens == want.tokens and got.stats.accepted_hist == want.stats.accepted_hist
    assert any(o.stats.accepted_hist[0] for o in outs)  # rejections: rollback across the rings' wrap
    assert pool.allocator.n_free == pool.allocator.capacity
    assert pool.ring_allocator.n_free == pool.ring_allocator.capacity


@pytest.mark.slow  # a model through the Triton interpreter
@needs_triton
@torch.no_grad()
def test_batched_engine_over_ring_pages_through_triton_is_exact():
    """The paged kernels over ring pages (dense decode, recording, selection, sparse verification), every chunk
    read: each sequence gets transformers' own greedy tokens."""
    from specattn_runtime import SpecAttnRuntime
    from test_engine_variants import artifact, transformers_greedy

    draft, target = engine_models("gemma2-softcap-d256")
    rt = SpecAttnRuntime(artifact(1.0), draft, target, engine="static", backend="triton", selection="triton",
                         exact_dense_shortcut=False)
    prompts = BATCH_PROMPTS[:2]
    outs = rt.generate_batch(prompts, 10, k=3, eos_token_id=None)
    assert rt._pool.ring_slots
    assert [o.tokens for o in outs] == [transformers_greedy("gemma2-softcap-d256", p, 10) for p in prompts]


def test_scheduler_waits_for_ring_pages():
    """Admission needs the sequence's pages and its ring pages: with rings for one sequence, the second waits
    until the first finishes, then gets the same ring pages back."""
    from specattn_runtime.engine.pages import PageAllocator
    from specattn_runtime.engine.scheduler import Scheduler
    from specattn_runtime.engine.sequence import Sequence

    sched = Scheduler(PageAllocator(64, 16), 4, ring_allocator=PageAllocator(1 + 6, 16), ring_pages=6)
    a, b = Sequence([1] * 40, 8, 2), Sequence([2] * 40, 8, 2)
    sched.add(a)
    sched.add(b)
    assert sched.admit() == [a] and len(a.ring_pages) == 6 and list(sched.waiting) == [b]
    rings = sorted(a.ring_pages)
    sched.finish(a)
    assert a.ring_pages == [] and sched.admit() == [b] and sorted(b.ring_pages) == rings


@torch.no_grad()
def test_ring_budget_is_counted_first():
    """kv_memory_gb pays for ``max_batch`` sequences' rings, then pages: a budget the rings use up is refused with
    both numbers; the pool built from a budget is no larger than it, and smaller than the full-length layout."""
    from specattn_runtime import SpecAttnRuntime
    from specattn_runtime.batched import PAGE_SIZE
    from specattn_runtime.engine.pages import PagedKVPool, bytes_per_page, pool_ring_slots, ring_pool_bytes
    from test_engine_variants import artifact

    draft, target = engine_models("qwen2-window-layers")
    models = {"target": target, "draft": draft}
    ring = pool_ring_slots(models, PAGE_SIZE)
    rings = ring_pool_bytes(models, ring, 4, PAGE_SIZE)
    rt = SpecAttnRuntime(artifact(0.6), draft, target, engine="static", exact_dense_shortcut=False)
    with pytest.raises(ValueError, match="beside the window layers' rings of 4 sequences"):
        rt.generate_batch(BATCH_PROMPTS, 4, k=2, kv_memory_gb=rings / 2**30, eos_token_id=None)
    assert rt._pool is None  # refused before anything was allocated
    budget = (rings + 64 * bytes_per_page(models, PAGE_SIZE, ring)) / 2**30
    rt.generate_batch(BATCH_PROMPTS, 4, k=2, kv_memory_gb=budget, eos_token_id=None)
    pool = rt._pool
    assert pool.n_pages == 64 and pool.nbytes() == budget * 2**30
    full = PagedKVPool(models, pool.n_pages, PAGE_SIZE)  # ring_sequences=0: every layer paged
    assert not full.ring_slots and pool.nbytes() < full.nbytes()
