"""The eager speculative loop: transformers' caches and masks, host control flow, one phase after another.

The CPU path, and the reference the decode engine (``engine/``) is tested against token for token: both call the
same selection contract and the same acceptance and sampling functions (``sampling.py``, ``rng.py``), so greedy
runs and seeded sampling runs agree as long as the attention arithmetic does.
"""

from __future__ import annotations

import time

import torch

from . import hooks
from .cache import preallocated_cache
from .rng import SLOT_FINAL, sample
from .sampling import greedy_accept, probs_device, speculative_accept
from .selection import select_chunks
from .sparse import key_mask_from_chunks
from .stats import GenerationOutput, GenerationStats, TokenSink, kv_read_sums


def select(rt, rows: dict[int, list[torch.Tensor]], n_keys: int, n_verify: int):
    """Chunk selection per sparse target layer for verifying the last ``n_verify`` of ``n_keys`` positions.

    Returns ``({target layer: selection}, counts)``: a selection is the Triton kernel's compacted
    ``(idx [1, C], count [1])`` or, for the torch methods, a bool mask ``[1, C]``; ``sparse_attention`` takes
    either form. ``counts`` int ``[n_sparse]`` stays on device.
    """
    c = -(-n_keys // rt.chunk_size)
    scores = {}
    for i, rs in rows.items():  # sum of the k draft rows, each padded to the full chunk count
        acc = torch.zeros(*rs[0].shape[:-1], c, device=rs[0].device)
        for r in rs:
            acc[..., : r.shape[-1]] += r
        scores[i] = acc  # [1, C] head-averaged, [1, Hkv_draft, C] per KV head
    if rt.per_head:  # one row per (sparse layer, target KV head): its mapped draft head's
        s = torch.cat([scores[rt.layer_map[j]][0, rt.head_map[j]] for j in rt.sparse_layers])  # [n_sparse * Hkv, C]
    else:
        s = torch.cat([scores[rt.layer_map[j]] for j in rt.sparse_layers])  # [n_sparse, C]
    recent = c - (n_keys - n_verify) // rt.chunk_size  # every verified position's chunk stays
    sel = _top_p(rt, s, rt._sparse_p, recent, rt.per_head)
    if isinstance(sel, tuple):
        return {j: (sel[0][r : r + 1], sel[1][r : r + 1]) for r, j in enumerate(rt.sparse_layers)}, sel[1]
    if rt.per_head:  # [1, Hkv, C] per layer; a layer's count is the mean over its KV heads
        mask = sel.view(len(rt.sparse_layers), -1, c)
        return {j: mask[r : r + 1] for r, j in enumerate(rt.sparse_layers)}, mask.sum(-1).double().mean(-1)
    return {j: sel[r : r + 1] for r, j in enumerate(rt.sparse_layers)}, sel.sum(-1)


def _top_p(rt, scores: torch.Tensor, p: torch.Tensor, keep_recent: int, per_head: bool):
    """Top-p over score rows ``[R, C]`` (each row's own p), the sink and the last ``keep_recent`` chunks kept:
    the Triton kernel's ``(idx, count)`` (per-layer rows with ``selection="triton"``) or a bool mask ``[R, C]``."""
    p = p.to(scores.device)
    if rt.selection == "triton" and not per_head:
        from .selection.triton_select import topp_select_triton

        n_valid = torch.full((scores.shape[0],), scores.shape[-1], dtype=torch.int32, device=scores.device)
        return topp_select_triton(scores, p, n_valid, keep_recent=keep_recent)
    return select_chunks(scores, p, method=rt.selection, keep_recent=keep_recent)


def draft_select(rt, rows: dict[int, list[torch.Tensor]], n_cached: int, k: int) -> dict[int, torch.Tensor]:
    """Sparse drafting: the chunks each sparse-drafting draft layer reads in the step's forwards after the first,
    from that first (dense) forward's rows, ``n_cached`` positions cached before the step (``L``).

    Candidates are the chunks the last draft (at ``L + k - 1``) sees; the sink and every chunk from the one
    holding ``L - 1`` on (the keys this step writes) are kept. Returns ``{draft layer: bool [1, C] or [1, Hkv,
    C]}`` (per KV head with a per-head artifact), the decode engine's ``_draft_select`` in host form.
    """
    cs = rt.chunk_size
    c = -(-(n_cached + k) // cs)
    layers = rt.draft_sparse_layers
    first = [rows[i][0] for i in layers]  # [1, C0] or [1, Hkv, C0]: the first forward's last query
    s = torch.zeros(len(layers), *first[0].shape[1:-1], c, device=first[0].device)
    for r, row in enumerate(first):
        s[r, ..., : row.shape[-1]] = row[0]
    hkv = s.shape[1] if rt.per_head else 1
    keep = c - max(n_cached - 1, 0) // cs
    sel = _top_p(rt, s.view(-1, c), rt._draft_p.repeat_interleave(hkv), keep, rt.per_head)
    if isinstance(sel, tuple):
        from .selection.triton_select import indices_to_mask

        sel = indices_to_mask(*sel, n_chunks=c)
    sel = sel.view(len(layers), -1, c) if rt.per_head else sel.view(len(layers), 1, c)[:, 0]
    return {i: sel[r : r + 1] for r, i in enumerate(layers)}


def _read_fractions(rt, masks: dict, counts: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Per sparse layer, the share of the keys visible to the newest query that verification read (on device).

    A sliding-window layer sees only its window, and reads no selected chunk outside it."""
    c = rt.chunk_size
    pad = -(-n_keys // c) * c - n_keys  # the newest chunk is always selected; its padding is not a read
    read = (counts.double() * c - pad) / n_keys
    for r, j in enumerate(rt.sparse_layers):
        window = rt.windows[j]
        if window is not None and window < n_keys:
            sel = masks[j]
            if isinstance(sel, tuple):
                from .selection.triton_select import indices_to_mask

                sel = indices_to_mask(*sel, n_chunks=-(-n_keys // c))
            read[r] = key_mask_from_chunks(sel, n_keys, c)[0][..., n_keys - window :].double().mean()
    return read


def _sampling_args(temperature: float, top_p: float, device) -> tuple | None:
    """Temperature and nucleus as one-element tensors, the form the engine keeps them in (so that both paths
    divide by a tensor and round alike); ``None`` for greedy decoding."""
    if temperature <= 0:
        return None
    t = torch.tensor([temperature], dtype=torch.float32, device=device)
    return t, (torch.tensor([top_p], dtype=torch.float32, device=device) if top_p < 1.0 else None)


def _choose(logits: torch.Tensor, sampling: tuple | None, seed: int, step: int, slot: int):
    """``(token int64 [1], probs or None)``: argmax, or a draw at ``(seed, step, slot)``."""
    if sampling is None:
        return logits.argmax(-1, keepdim=True), None
    q = probs_device(logits, *sampling)
    return sample(q, seed, step, slot), q


@torch.no_grad()
def generate_eager(rt, ids: list[int], max_new_tokens: int, k: int, temperature: float, top_p: float,
                   eos_token_id: int | None, seed: int, on_tokens) -> GenerationOutput:
    """The loop behind ``SpecAttnRuntime.generate(..., engine="eager")``; arguments already validated."""
    dev = next(rt.target.parameters()).device
    n = len(ids)
    ids_t = torch.tensor([ids], dtype=torch.long, device=dev)
    stats = GenerationStats(engine="eager", accepted_hist=[0] * (k + 1))
    kv_read = torch.zeros(len(rt.sparse_layers), dtype=torch.float64, device=dev)  # summed on device: no sync
    draft_read = torch.zeros(len(rt.draft_sparse_layers), dtype=torch.float64, device=dev)
    t_start = time.perf_counter()

    capacity = n + max_new_tokens + k + 1  # written in place: no per-step copy of the whole cache
    dcache = preallocated_cache(rt.draft.config.num_hidden_layers, capacity) if k else None
    tcache = preallocated_cache(rt.target.config.num_hidden_layers, capacity)
    if n > 1:  # prefill everything but the last token, densely; it is fed as the first query of step 1
        if k:
            rt.draft(ids_t[:, :-1], past_key_values=dcache, use_cache=True, logits_to_keep=1)
        rt.target(ids_t[:, :-1], past_key_values=tcache, use_cache=True, logits_to_keep=1)
    rt._sync()
    stats.time_prefill = time.perf_counter() - t_start
    cur = ids_t[:, -1:]
    prev = ids[-2] if n > 1 else None  # the token at the last cached position
    sampling = _sampling_args(temperature, top_p, dev)
    sink = TokenSink(max_new_tokens, eos_token_id, on_tokens)
    while not sink.done:
        step = stats.steps  # the random draws of this step are (seed, step, slot)
        rt._sync()
        t0 = time.perf_counter()
        if k == 0:  # plain autoregressive decoding of the target
            logits = rt.target(cur, past_key_values=tcache, use_cache=True).logits[0, -1]
            nxt = _choose(logits, sampling, seed, step, SLOT_FINAL)[0]
            new = [int(nxt)]
            cur = nxt.view(1, 1)
            rt._sync()
            stats.time_verify += time.perf_counter() - t0
            stats.steps += 1
            stats.accepted_hist[0] += 1
        else:
            new = _speculative_step(rt, prev, cur, dcache, tcache, n, k, sampling, seed, step, stats, kv_read,
                                    draft_read)
            # the token now at the last cached position: the last accepted draft, or the step's first token
            prev = int(cur) if len(new) == 1 else new[-2]
            n += len(new)
            cur = torch.tensor([[new[-1]]], device=dev)
        sink.add(new)
    stats.kv_read_sum = kv_read_sums(len(rt.layer_map), stats.steps, rt.sparse_layers if k else [], kv_read.tolist())
    if k:
        stats.draft_kv_read_sum = kv_read_sums(rt.draft.config.num_hidden_layers, stats.steps,
                                               rt.draft_sparse_layers if k > 1 else [], draft_read.tolist())
    stats.new_tokens = len(sink.tokens)
    stats.time_total = time.perf_counter() - t_start
    return GenerationOutput(sink.tokens, stats, sink.finish_reason)


def _draft_read_fractions(rt, masks: dict, n_keys: int) -> torch.Tensor:
    """Per sparse-drafting layer, the share of the ``n_keys`` keys the last draft sees that its selection reads
    (mean over KV heads; the newest chunk's padding is not a read)."""
    from .engine.step import read_share

    counts = torch.stack([masks[i].sum(-1).double().mean() for i in rt.draft_sparse_layers])
    return read_share(counts, torch.tensor(float(n_keys), dtype=torch.float64), rt.chunk_size).clamp(max=1.0)


def _speculative_step(rt, prev, cur, dcache, tcache, n, k, sampling, seed, step, stats, kv_read,
                      draft_read) -> list[int]:
    """Draft, select, verify, accept; rolls both caches back. Returns the emitted tokens. ``n``: the prompt so
    far (cached positions + the last emitted token, ``cur``); ``prev``: the token at position ``n - 2``."""
    # 1. draft k tokens in k forwards. The first also (re)computes the draft's position n - 2: after a step that
    # accepted every draft, the last drafted token is accepted but was never fed to the draft (gpt-fast runs an
    # extra forward in that case; one shape for every step is what a captured graph needs)
    t0 = time.perf_counter()
    # the first forward also records the sparse-drafting layers (their selection for the later forwards)
    sparse_draft = k > 1 and bool(rt.draft_sparse_layers)
    dstate = hooks.StepState("draft", rt.chunk_size, record_layers=rt.record_layers | set(rt.draft_sparse_layers),
                             per_kv_head=rt.per_head, backend=rt.backend)
    drafted, q_probs = [], []
    if prev is None:  # one-token prompt: nothing cached before cur
        tok = cur
    else:
        dcache.crop((n - 2) - dcache.get_seq_length())  # keep positions < n - 2
        tok = torch.cat([torch.tensor([[prev]], device=cur.device), cur], dim=1)
    for s in range(k):
        logits = rt.draft(tok, past_key_values=dcache, use_cache=True, specattn_state=dstate).logits[0, -1]
        nxt, q = _choose(logits, sampling, seed, step, s)
        if q is not None:
            q_probs.append(q)
        drafted.append(nxt)
        tok = nxt.view(1, 1)
        if s == 0 and sparse_draft:  # the later forwards read the chunks the first one's attention selects
            dstate.chunk_masks = draft_select(rt, dstate.rows, n - 1, k)
            dstate.record_layers = rt.record_layers if rt.plan.sparse_forwards_guide else frozenset()
            draft_read += _draft_read_fractions(rt, dstate.chunk_masks, n - 1 + k)
    drafted_t = torch.cat(drafted)  # [k]
    rt._sync()
    t1 = time.perf_counter()
    # 2. select chunks per sparse target layer
    n_keys = n + k  # keys the verification sees: the cache (n - 1) + cur + k drafted
    masks, counts = select(rt, dstate.rows, n_keys, k + 1) if rt.sparse_layers else ({}, None)
    rt._sync()
    t2 = time.perf_counter()
    # 3. verify k + 1 positions
    vstate = hooks.StepState("verify", rt.chunk_size, chunk_masks=masks, backend=rt.backend)
    block = torch.cat([cur.view(1), drafted_t]).view(1, -1)
    tlogits = rt.target(block, past_key_values=tcache, use_cache=True, specattn_state=vstate).logits[0]
    rt._sync()
    t3 = time.perf_counter()
    # 4. accept, then roll both caches back to the accepted prefix
    if sampling is not None:
        n_acc, nxt = speculative_accept(drafted_t, torch.stack(q_probs), probs_device(tlogits, *sampling), seed, step)
    else:
        n_acc, nxt = greedy_accept(drafted_t, tlogits)
    if n_acc < k:  # the target cache holds n + k positions (the draft's n + k - 1): drop the rejected ones
        tcache.crop(n_acc - k)
        dcache.crop((n + n_acc) - dcache.get_seq_length())
    stats.steps += 1
    stats.drafted += k
    stats.accepted += n_acc
    stats.accepted_hist[n_acc] += 1
    if counts is not None:
        kv_read += _read_fractions(rt, masks, counts, n_keys)
    stats.time_draft += t1 - t0
    stats.time_select += t2 - t1
    stats.time_verify += t3 - t2
    return drafted_t[:n_acc].tolist() + [nxt]
