"""``SpecAttnRuntime.generate_batch``: many prompts decoded together over a paged KV pool.

With ``engine="static"`` (the default on CUDA) the prompts run through the batched engine (``engine/batch.py``:
one step for every running sequence, graphs per batch bucket on CUDA, eager phases elsewhere). With
``engine="eager"`` each prompt runs through the eager reference loop in turn: the same tokens a sequence gets
alone, which is what the batched engine is tested against.

The pool (``engine/pages.py``) is kept by the runtime between calls and sized from ``kv_memory_gb`` (GiB of K/V for
both models), ``kv_memory_fraction`` (of the GPU memory free now), or, given neither, from what the batch needs.
Models with sliding-window layers keep those layers in rings, one per running sequence (``max_batch`` of them,
taken from the budget first); the rest of the budget is pages of the full layers. A batch whose sequences cannot
all be held at once is refused before any work, with the numbers.
"""

from __future__ import annotations

import torch

from . import rng, validate
from .engine import SparsePlan, self_plan
from .engine.batch import BUCKETS, bucket_for
from .engine.pages import PagedKVPool, bytes_per_page, pool_ring_slots, ring_pool_bytes
from .engine.runner import BatchRunner
from .engine.sequence import Sequence
from .stats import GenerationOutput

PAGE_SIZE = 16  # positions per page: one selection chunk, so a chunk never straddles two pages
MAX_PAGES_STEP = 128  # page tables (and the graphs captured over them) come in multiples of this many pages


def _seeds(seed, n: int) -> list[int]:
    """One seed per prompt: ``None`` draws each; an int is every sequence's own seed (a sequence's draws are keyed
    by its seed and its own step, so it samples the same tokens alone and in any batch); a list gives each one."""
    if seed is None:
        return [rng.new_seed() for _ in range(n)]
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"seed holds {len(seed)} values for {n} prompts; give one per prompt or a single int")
        return [int(s) % 2**62 for s in seed]
    return [int(seed) % 2**62] * n


def generate_batch(rt, prompts, max_new_tokens: int = 256, *, k: int = 6, temperature: float = 0.0,
                   top_p: float = 1.0, eos_token_id: int | None = None, seed=None, max_batch: int | None = None,
                   kv_memory_gb: float | None = None, kv_memory_fraction: float | None = None,
                   prefill_tokens: int | None = None) -> list[GenerationOutput]:
    """The body of :meth:`SpecAttnRuntime.generate_batch` (see there)."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise TypeError("prompts must be a list of prompts (each a list of token ids)")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; give at least one prompt")
    seeds = _seeds(seed, len(prompts))
    vocab = min(m.get_input_embeddings().num_embeddings for m in ((rt.target, rt.draft) if k else (rt.target,)))
    validate.generation(max_new_tokens, k, temperature, top_p, None, eos_token_id, vocab)
    ids = []
    for i, p in enumerate(prompts):
        try:
            ids.append(validate.prompt_ids(p, vocab))
        except (TypeError, ValueError) as e:
            raise type(e)(f"prompts[{i}]: {e}") from None
    for p in ids:  # warns once per runtime if a prompt lacks the BOS calibration assumed
        validate.calibrated_prefix(p, rt.artifact.metadata, rt)
    limit = rt.context_limit(k)
    for i, p in enumerate(ids):
        if len(p) + max_new_tokens + k + 1 > limit:
            raise ValueError(f"prompts[{i}] of {len(p)} tokens + max_new_tokens={max_new_tokens} + k={k} exceeds "
                             f"the models' context of {limit} tokens; shorten it or generate fewer tokens")
    if max_batch is not None:
        validate._integer("max_batch", max_batch, 1)
    if eos_token_id is None and rt.tokenizer is not None:
        eos_token_id = rt.tokenizer.eos_token_id
    if rt.engine == "eager":
        return [rt.generate(p, max_new_tokens, k=k, temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                            seed=s) for p, s in zip(ids, seeds)]
    seqs = [Sequence(p, max_new_tokens, k, temperature=temperature, top_p=top_p, seed=s, eos_token_id=eos_token_id)
            for p, s in zip(ids, seeds)]
    slots = bucket_for(min(len(seqs), max_batch or BUCKETS[-1]), max_batch or BUCKETS[-1])
    pool = rt._batch_pool(seqs, slots, kv_memory_gb, kv_memory_fraction)
    runner = rt._batch_runner(k, temperature, top_p, slots, seqs, pool, prefill_tokens)
    with torch.no_grad():
        return runner.run(seqs)


def pages_at_once(seqs: list[Sequence], slots: int) -> list[int]:
    """Pages of the ``slots`` largest sequences: the most that may run at once."""
    return sorted((-(-s.positions_needed // PAGE_SIZE) for s in seqs), reverse=True)[:slots]


def check_pool_fits(pool_pages: int, page_bytes: int, seqs: list[Sequence], slots: int, ring_bytes: int = 0) -> None:
    """The ``slots`` largest sequences (those that may run at once) must fit the pool together (``ring_bytes``:
    the rings of ``slots`` sequences, held beside the pages)."""
    need = pages_at_once(seqs, slots)
    if sum(need) > pool_pages - 1:
        gb = ((sum(need) + 1) * page_bytes + ring_bytes) / 2**30
        raise ValueError(f"the batch needs {sum(need)} KV pages of {PAGE_SIZE} positions at once "
                         f"({len(need)} sequences), the pool has {max(pool_pages - 1, 0)}: raise kv_memory_gb to at "
                         f"least {gb:.2f}, pass a smaller max_batch, or shorten the prompts or max_new_tokens")


def pool_pages(models: dict, seqs: list[Sequence], slots: int, kv_memory_gb: float | None,
               kv_memory_fraction: float | None, current: PagedKVPool | None) -> int | None:
    """Pages of the pool to run ``seqs`` on (with rings for ``slots`` sequences where the models have window
    layers), or ``None`` when ``current`` is the size asked for (or, unsized, large enough). Raises before anything
    is allocated when the batch cannot fit."""
    ring = pool_ring_slots(models, PAGE_SIZE)
    page_bytes = bytes_per_page(models, PAGE_SIZE, ring)
    ring_bytes = ring_pool_bytes(models, ring, slots, PAGE_SIZE)
    rings_held = current is None or not ring or current.ring_sequences >= slots
    if kv_memory_gb is not None and kv_memory_fraction is not None:
        raise ValueError("pass kv_memory_gb or kv_memory_fraction, not both")
    if kv_memory_gb is not None:
        if not kv_memory_gb > 0:
            raise ValueError(f"kv_memory_gb must be > 0, got {kv_memory_gb}")
        n_pages = int((kv_memory_gb * 2**30 - ring_bytes) // page_bytes)
    elif kv_memory_fraction is not None:
        if not 0 < kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction must lie in (0, 1], got {kv_memory_fraction}")
        dev = next(next(iter(models.values())).parameters()).device
        if dev.type != "cuda":
            raise ValueError("kv_memory_fraction sizes the pool from free GPU memory; on the CPU pass kv_memory_gb")
        free = torch.cuda.mem_get_info(dev)[0] + (current.nbytes() if current is not None else 0)
        n_pages = int((free * kv_memory_fraction - ring_bytes) // page_bytes)
    else:  # what the batch needs at once, unless the pool already holds it
        need = sum(pages_at_once(seqs, slots))
        if current is not None and current.n_pages - 1 >= need and rings_held:
            return None
        n_pages = need + 1
    if n_pages < 2:  # a budget without even one page beside the scratch page
        raise ValueError(f"the KV budget holds no page of {PAGE_SIZE} positions ({page_bytes / 2**20:.2f} MiB each)"
                         + (f" beside the window layers' rings of {slots} sequences ({ring_bytes / 2**30:.2f} GiB)"
                            if ring_bytes else "") + ": raise kv_memory_gb or kv_memory_fraction, or lower max_batch")
    check_pool_fits(n_pages, page_bytes, seqs, slots, ring_bytes)
    return None if current is not None and current.n_pages == n_pages and rings_held else n_pages


def max_pages_for(seqs: list[Sequence], pool: PagedKVPool) -> int:
    """Page-table width for these sequences, rounded up so that later calls reuse the engine and its graphs."""
    longest = max(-(-s.positions_needed // pool.page_size) for s in seqs)
    return min(-(-longest // MAX_PAGES_STEP) * MAX_PAGES_STEP, pool.n_pages - 1)


def runner_for(rt, k: int, sampling: str, slots: int, max_pages: int, pool: PagedKVPool,
               prefill_tokens: int | None) -> BatchRunner:
    plan = rt.plan if k else SparsePlan(chunk_size=rt.chunk_size)
    mode = "draft"
    if rt.mode == "self" and k:  # the target drafts for itself, one pool
        plan = self_plan(rt.sparse_layers, [rt.top_p[j] for j in rt.sparse_layers], rt.chunk_size)
        mode = "self"
    forwards = {role: f for role, f in rt._model_forwards().items() if role in pool.models}
    kw = {} if prefill_tokens is None else {"prefill_tokens": int(prefill_tokens)}
    return BatchRunner(rt.target, pool, plan, k, forwards, max_batch=slots, max_pages=max_pages, mode=mode,
                       sampling=sampling, backend=rt.backend, graphs=next(rt.target.parameters()).is_cuda,
                       engine_class=rt.batch_engine_class, **kw)
