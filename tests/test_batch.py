"""Batched decoding over the paged KV pool (``generate_batch``, ``engine/batch.py``, ``engine/scheduler.py``).

Every sequence of a batch must get exactly what it gets alone: the batched engine (on CPU its phases run eagerly,
with the torch attention over the pool's pages) against the eager loop run per prompt, token for token, with the
same acceptance and KV reads; prompts of different lengths, sequences finishing at different steps, continuous
batching past ``max_batch``, seeded sampling independent of the neighbours, and every page back in the pool.
"""

import dataclasses

import pytest
import torch

from specattn_runtime import SpecAttnRuntime
from specattn_runtime.engine.pages import PageAllocator, PagesExhausted
from specattn_runtime.engine.scheduler import Scheduler
from specattn_runtime.engine.sequence import Sequence, Status

from artifact_factory import make_artifact
from test_engine import noisy_copy, pair
from test_engine_per_head import head_artifact
from test_runtime_devices import tiny_llama


def prompts(seed: int, lengths=(300, 37, 150, 1)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


def same_outputs(alone, batched):
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        assert a.tokens == b.tokens, f"sequence {i}"
        assert a.finish_reason == b.finish_reason, f"sequence {i}"
        assert a.stats.accepted_hist == b.stats.accepted_hist, f"sequence {i}"
        # recording in a batch adds the same masses in another order: a chunk on the top-p boundary may flip
        assert a.stats.kv_read_fraction == pytest.approx(b.stats.kv_read_fraction, rel=0.02), f"sequence {i}"


def all_pages_free(rt):
    alloc = rt._pool.allocator
    assert alloc.n_free == alloc.capacity


@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batch_equals_each_prompt_alone(k, temperature):
    eager, static = pair(0.6)
    ps = prompts(k + 7)
    kw = dict(k=k, temperature=temperature, top_p=0.9, seed=11)
    # an EOS that the first sequence emits early: the sequences finish at different steps, for different reasons
    eos = eager.generate(ps[0], 30, eos_token_id=None, **kw).tokens[6]
    alone = eager.generate_batch(ps, 30, eos_token_id=eos, **kw)
    batched = static.generate_batch(ps, 30, eos_token_id=eos, **kw)
    assert alone[0].finish_reason == "stop" and len(alone[0].tokens) <= 7
    assert len({len(o.tokens) for o in alone}) > 1  # they finish at different steps
    same_outputs(alone, batched)
    assert all(o.stats.engine == "batched" for o in batched)
    all_pages_free(static)


def test_per_head_selection_and_continuous_batching():
    """Per-KV-head selection in a batch; six prompts through two slots (the rest wait, then join)."""
    target = tiny_llama(4, 2, "cpu")
    draft = noisy_copy(target, 0.01, 1)
    art = head_artifact()
    eager = SpecAttnRuntime(art, draft, target, engine="eager", exact_dense_shortcut=False)
    static = SpecAttnRuntime(art, draft, target, engine="static", exact_dense_shortcut=False)
    assert static.per_head
    ps = prompts(3, (90, 17, 260, 5, 64, 33))
    alone = eager.generate_batch(ps, 24, k=4, eos_token_id=None)
    same_outputs(alone, static.generate_batch(ps, 24, k=4, eos_token_id=None, max_batch=2))
    all_pages_free(static)
    same_outputs(alone, static.generate_batch(ps, 24, k=4, eos_token_id=None))  # all at once, pool reused
    all_pages_free(static)


def test_seeded_sampling_is_independent_of_the_neighbours():
    _, static = pair(0.6)
    ps = prompts(5)
    kw = dict(k=4, temperature=1.0, eos_token_id=None)
    batch = static.generate_batch(ps, 20, seed=[3, 4, 5, 6], **kw)
    for i, p in enumerate(ps):
        assert static.generate_batch([p], 20, seed=3 + i, **kw)[0].tokens == batch[i].tokens
    other = static.generate_batch(ps[::-1], 20, seed=[6, 5, 4, 3], **kw)  # other neighbours, other slots
    assert [o.tokens for o in other[::-1]] == [b.tokens for b in batch]


def self_runtime(target, top_p: float, engine: str):
    art = make_artifact(n_t=4, n_d=4, dense=1)
    art = dataclasses.replace(art, layer_map=torch.arange(4, dtype=torch.int32).where(torch.arange(4) > 0, -1),
                              top_p=torch.tensor([1.0] + [top_p] * 3), metadata={**art.metadata, "mode": "self",
                                                                                "dense_layers": "1"})
    return SpecAttnRuntime(art, None, target, engine=engine, exact_dense_shortcut=False)


def test_self_speculation_batch_is_lossless():
    """Mode ``self``: the batch equals plain greedy decoding of the target and the one-sequence engine's steps."""
    target = tiny_llama(4, 2, "cpu")
    ps = prompts(9, (200, 40, 120))
    plain = [self_runtime(target, 0.3, "eager").generate(p, 24, k=0, eos_token_id=None).tokens for p in ps]
    static = self_runtime(target, 0.3, "static")
    batched = static.generate_batch(ps, 24, k=3, eos_token_id=None)
    assert [o.tokens for o in batched] == plain
    for p, b in zip(ps, batched):
        one = static.generate(p, 24, k=3, eos_token_id=None)  # the single-sequence SelfSpecEngine
        assert one.stats.accepted_hist == b.stats.accepted_hist
        assert one.stats.kv_read_fraction == pytest.approx(b.stats.kv_read_fraction, rel=0.02)
    all_pages_free(static)


def test_a_batch_too_large_for_the_pool_is_refused_and_changes_nothing():
    eager, static = pair(0.6)
    ps = prompts(1)
    first = static.generate_batch(ps, 16, k=2, eos_token_id=None, kv_memory_gb=0.01)
    pool = static._pool
    with pytest.raises(ValueError, match=r"needs \d+ KV pages .* the pool has \d+: raise kv_memory_gb to at least"):
        static.generate_batch(ps * 8, 16, k=2, eos_token_id=None, kv_memory_gb=0.0005)
    with pytest.raises(ValueError, match="needs .* pages"):  # a prompt that never fits, even alone
        static.generate_batch([ps[0] * 3], 16, k=2, eos_token_id=None, kv_memory_gb=0.0002)
    assert static._pool is pool
    all_pages_free(static)
    again = static.generate_batch(ps, 16, k=2, eos_token_id=None, kv_memory_gb=0.01)
    assert [o.tokens for o in again] == [o.tokens for o in first]
    assert [o.tokens for o in first] == [o.tokens for o in eager.generate_batch(ps, 16, k=2, eos_token_id=None)]


@pytest.mark.parametrize("bad, error, match", [
    ([], ValueError, "prompts is empty"),
    ("some text", TypeError, "list of prompts"),
    ([[1, 2], []], ValueError, r"prompts\[1\]: prompt_ids is empty"),
    ([[1, 2], [1, 10**6]], ValueError, r"prompts\[1\]"),
])
def test_bad_batches_are_refused(bad, error, match):
    _, static = pair(0.6)
    with pytest.raises(error, match=match):
        static.generate_batch(bad, 8, k=2)


def test_seed_list_must_match():
    _, static = pair(0.6)
    with pytest.raises(ValueError, match="2 values for 3 prompts"):
        static.generate_batch(prompts(1, (4, 5, 6)), 4, k=1, temperature=1.0, seed=[1, 2])


# -- the scheduler and the allocator, no model -----------------------------------------------------------------------

def seq(n_prompt: int, n_new: int, k: int = 1) -> Sequence:
    return Sequence(list(range(n_prompt)), n_new, k)


def test_allocator_hands_out_and_takes_back():
    a = PageAllocator(6, 16)
    assert a.capacity == 5 and a.pages_for(33) == 3
    got = a.allocate(3)
    assert 0 not in got and len(set(got)) == 3 and a.n_free == 2
    with pytest.raises(PagesExhausted, match="3 pages needed, 2 free"):
        a.allocate(3)
    assert a.n_free == 2  # a refused allocation takes nothing
    a.free(got)
    assert a.n_free == 5
    with pytest.raises(RuntimeError, match="not allocated"):
        a.free(got[:1])


def test_scheduler_admits_by_pages_first_come_first_served_and_compacts():
    s = Scheduler(PageAllocator(9, 16), max_batch=3)  # 8 usable pages
    big, small1, small2, small3 = seq(60, 10), seq(8, 5), seq(8, 5), seq(8, 5)  # 5, 1, 1, 1 pages
    for x in (big, small1, small2, small3):
        s.add(x)
    assert s.admit() == [big, small1, small2]  # the batch is full at 3
    assert [x.slot for x in s.running] == [0, 1, 2] and small3.status is Status.WAITING
    assert s.finish(big) == (2, 0)  # the last running sequence moves into the freed slot
    assert [x.slot for x in s.running] == [0, 1] and s.running[0] is small2
    assert s.admit() == [small3] and small3.slot == 2
    assert s.finish(small3) is None  # the last slot: nothing moves
    with pytest.raises(ValueError, match="needs 9 pages .* the KV pool has 8"):
        s.add(seq(130, 10))
    for x in list(s.running):
        s.finish(x)
    assert s.idle and s.allocator.n_free == 8


def test_scheduler_waits_for_pages_in_arrival_order():
    s = Scheduler(PageAllocator(7, 16), max_batch=4)  # 6 usable pages
    first, second, third = seq(60, 10), seq(60, 10), seq(5, 2)  # 5, 5, 1 pages
    for x in (first, second, third):
        s.add(x)
    assert s.admit() == [first]  # second does not fit; third, behind it, waits too
    s.finish(first)
    assert s.admit() == [second, third]


@pytest.mark.slow
def test_shipped_pair_batch_equals_each_prompt_alone(quick_pair):
    """SmolLM2-135M and its early-exit draft on real text: three prompts of different lengths, k = 4, sparse
    verification at p 0.7 on every mapped layer."""
    from pipelines import assets
    from pipelines.corpus import wiki_articles
    from specattn_runtime.hooks import register
    from specattn_runtime.models import load_causal_lm, load_tokenizer

    name = register()
    draft = load_causal_lm(quick_pair[0], attn_implementation=name)
    target = load_causal_lm(quick_pair[1], attn_implementation=name)
    art = make_artifact(n_t=30, n_d=10, dense=2)
    art = dataclasses.replace(art, top_p=torch.tensor([1.0, 1.0] + [0.7] * 28))
    tok = load_tokenizer(quick_pair[1])
    texts = [t for _, t in wiki_articles(assets.fetch(assets.ENWIKI_BZ2))[3:6]]
    ps = [tok(t).input_ids[:n] for t, n in zip(texts, (300, 70, 170))]
    eager = SpecAttnRuntime(art, draft, target, tok, engine="eager")
    static = SpecAttnRuntime(art, draft, target, tok, engine="static")
    alone = eager.generate_batch(ps, 16, k=4)
    same_outputs(alone, static.generate_batch(ps, 16, k=4))
    all_pages_free(static)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_forwards_serve_every_batch_bucket_and_query_length():
    """torch.compile'd forwards (inductor on the CPU) for a draft and a target over batch buckets 1 to 8 and
    query lengths 1, 2 and k + 1 in one process: dynamo keeps a function's graphs on its code object and, with
    fullgraph, fails hard past 8 of them, which one shared forward reached at the third bucket. Each shape now
    compiles on a code object of its own; every batch gets the eager loop's tokens."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, static = pair(0.6, compile=True)
    assert static.compile
    for n in (1, 2, 3):  # buckets 1, 2 and 4; three shapes each (draft 2 and 1 tokens, target k + 1)
        ps = prompts(n, lengths=(40, 23, 31)[:n])
        want = [o.tokens for o in eager.generate_batch(ps, 6, k=3, eos_token_id=None)]
        assert [o.tokens for o in static.generate_batch(ps, 6, k=3, eos_token_id=None)] == want, n
    assert counters["stats"]["unique_graphs"] > 8  # more shapes than dynamo allows one code object
