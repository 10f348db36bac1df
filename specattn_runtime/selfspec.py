"""Self-speculation (artifact mode ``self``): the model drafts for itself with sparse attention, then verifies densely.

One model, one KV cache. A step, with ``L`` positions cached and ``cur`` the last emitted token:

1. draft: ``k`` one-token forwards of the model at positions ``L .. L + k - 1``; each sparse layer reads, per KV
   head, only the chunks selected after the previous verification (plus every key written since: the last
   selected chunk onward);
2. verify: the cache is cut back to ``L`` and one dense ``k + 1``-token forward recomputes those positions (so
   the cache and the logits are exactly the model's own: lossless) while its sparse layers record, per KV head,
   the chunk-pooled attention of the ``k + 1`` queries;
3. accept (greedy or rejection sampling, as in mode ``draft``), cut the cache to the accepted prefix;
4. select, per (sparse layer, KV head), the top-p chunks of that recorded attention over the ``L`` kept keys:
   the next round's drafting reads only those. The prefill records its last ``k + 1`` queries the same way, so
   the first round is sparse too.

The selection costs no extra pass: the verification already computes the attention it is taken from (the SpecAttn
2026 and SparseSpec/PillarAttn papers). This is the eager loop (CPU, and the reference); per-KV-head selections
are read by the torch or Triton sparse backend. The decode engine's version (``engine/self_step.py``) selects per
layer and starts dense.
"""

from __future__ import annotations

import time

import torch

from . import hooks
from .cache import preallocated_cache
from .eager import _choose, _sampling_args
from .sampling import greedy_accept, probs_device, speculative_accept
from .selection import select_chunks
from .sparse import key_mask_from_chunks
from .stats import GenerationOutput, GenerationStats, TokenSink, kv_read_sums


def select_per_kv_head(rows: dict[int, torch.Tensor], layers: list[int], p: torch.Tensor, n_keys: int,
                       chunk_size: int, method: str = "threshold") -> dict[int, torch.Tensor]:
    """Top-p chunks per (layer, KV head) over the first ``n_keys`` keys.

    ``rows[layer]`` float ``[1, Hkv, >= ceil(n_keys / chunk_size)]`` (recorded over a block that may have seen
    more keys: rejected positions, cut here); ``p`` float ``[len(layers)]``. Returns ``{layer: bool [1, Hkv, C]}``
    with ``C = ceil(n_keys / chunk_size)``, the sink and the newest chunk always selected.
    """
    c = -(-n_keys // chunk_size)
    scores = torch.stack([rows[j][0, :, :c] for j in layers])  # [n_layers, Hkv, C]
    n, hkv, _ = scores.shape
    mask = select_chunks(scores.reshape(n * hkv, c), p.to(scores.device).repeat_interleave(hkv), method=method)
    return {j: mask.view(n, hkv, c)[r : r + 1] for r, j in enumerate(layers)}


def draft_read_fraction(masks: dict[int, torch.Tensor], layers: list[int], windows: list, n_keys: int,
                        chunk_size: int) -> torch.Tensor:
    """Per sparse layer, the share of the keys visible to a draft query at position ``n_keys - 1`` that its
    attention reads (mean over KV heads; a sliding-window layer counts within its window)."""
    out = []
    for j in layers:
        keys = key_mask_from_chunks(hooks._extend(masks[j], -(-n_keys // chunk_size)), n_keys, chunk_size)[0]
        w = windows[j]
        if w is not None and w < n_keys:
            keys = keys[:, n_keys - w :]
        out.append(keys.double().mean())
    return torch.stack(out)


@torch.no_grad()
def generate_self_eager(rt, ids: list[int], max_new_tokens: int, k: int, temperature: float, top_p: float,
                        eos_token_id: int | None, seed: int, on_tokens) -> GenerationOutput:
    """The loop behind ``SpecAttnRuntime.generate`` for a mode ``self`` artifact; arguments already validated."""
    model = rt.target
    dev = next(model.parameters()).device
    n = len(ids)
    ids_t = torch.tensor([ids], dtype=torch.long, device=dev)
    layers = list(rt.sparse_layers)
    stats = GenerationStats(engine="eager", accepted_hist=[0] * (k + 1))
    kv_read = torch.zeros(len(layers), dtype=torch.float64, device=dev)
    t_start = time.perf_counter()
    cache = preallocated_cache(model.config.num_hidden_layers, n + max_new_tokens + k + 1)

    def select(rows, n_keys):
        return select_per_kv_head(rows, layers, rt._sparse_p, n_keys, rt.chunk_size, rt.selection) if layers else {}

    masks: dict[int, torch.Tensor] = {}
    if n > 1:  # prefill all but the last token densely, recording its last k + 1 queries for the first selection
        st = hooks.StepState("record", rt.chunk_size, record_layers=frozenset(layers), record_queries=k + 1)
        model(ids_t[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1, specattn_state=st)
        masks = select(st.rows, n - 1)
    rt._sync()
    stats.time_prefill = time.perf_counter() - t_start
    length, cur = n - 1, ids_t[:, -1:]
    sampling = _sampling_args(temperature, top_p, dev)
    sink = TokenSink(max_new_tokens, eos_token_id, on_tokens)
    while not sink.done:
        step = stats.steps
        t0 = time.perf_counter()
        # 1. draft k tokens with the sparse layers reading the selected chunks (dense while nothing is cached)
        dstate = hooks.StepState("verify", rt.chunk_size, chunk_masks=masks, backend=rt.backend)
        drafted, q_probs, tok = [], [], cur
        for s in range(k):
            logits = model(tok, past_key_values=cache, use_cache=True, specattn_state=dstate).logits[0, -1]
            nxt, q = _choose(logits, sampling, seed, step, s)
            if q is not None:
                q_probs.append(q)
            drafted.append(nxt)
            tok = nxt.view(1, 1)
            if masks:
                kv_read += draft_read_fraction(masks, layers, rt.windows, length + s + 1, rt.chunk_size) / k
            else:  # a one-token prompt's first round: nothing was selected, everything is read
                kv_read += 1.0 / k
        drafted_t = torch.cat(drafted)
        rt._sync()
        t1 = time.perf_counter()
        # 2. verify densely from position `length`: the drafts' own K/V (computed sparsely) are overwritten
        cache.crop(length - cache.get_seq_length())
        vstate = hooks.StepState("record", rt.chunk_size, record_layers=frozenset(layers), record_queries=k + 1)
        block = torch.cat([cur.view(1), drafted_t]).view(1, -1)
        tlogits = model(block, past_key_values=cache, use_cache=True, specattn_state=vstate).logits[0]
        # 3. accept; keep the cur and accepted positions
        if sampling is not None:
            n_acc, nxt = speculative_accept(drafted_t, torch.stack(q_probs), probs_device(tlogits, *sampling), seed,
                                            step)
        else:
            n_acc, nxt = greedy_accept(drafted_t, tlogits)
        length += n_acc + 1
        cache.crop(length - cache.get_seq_length())
        rt._sync()
        t2 = time.perf_counter()
        # 4. the next round's chunks, from the attention this verification computed
        masks = select(vstate.rows, length)
        rt._sync()
        t3 = time.perf_counter()
        stats.steps += 1
        stats.drafted += k
        stats.accepted += n_acc
        stats.accepted_hist[n_acc] += 1
        stats.time_draft += t1 - t0
        stats.time_verify += t2 - t1
        stats.time_select += t3 - t2
        new = drafted_t[:n_acc].tolist() + [nxt]
        cur = torch.tensor([[nxt]], device=dev)
        sink.add(new)
    stats.kv_read_sum = kv_read_sums(len(rt.layer_map), stats.steps, layers if k else [], kv_read.tolist())
    stats.new_tokens = len(sink.tokens)
    stats.time_total = time.perf_counter() - t_start
    return GenerationOutput(sink.tokens, stats, sink.finish_reason)
