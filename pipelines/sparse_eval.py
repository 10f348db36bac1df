"""Teacher-forced sparse perplexity: one forward pass per text and method, equal to step-by-step decoding.

Protocol (DESIGN.md section 5, after the paper): a text of ``T`` tokens, the first ``prefill`` positions attend
densely; every later query ``t`` is a decode step that reads only its selected KV chunks in the sparse layers.
Because query ``t``'s keys and values come from positions ``<= t``, whose own hidden states were computed under
their own masks, running all positions at once with a per-query block mask gives exactly the logits of
decoding token by token (``tests/test_sparse_eval.py`` checks this against the runtime's sparse attention). The
dense prefill runs once per text into a KV cache; each method's pass runs the decode queries on top of it.

Methods select chunks per (layer, query):

- ``specattn``: top-p on the draft's attention row at ``t`` (layer map and p per layer, as at run time);
- ``specattn_head``: per target KV head, top-p (its own p) on the attention row of the draft KV head the head map
  assigns it (one chunk set per KV head, as the runtime selects with a per-head artifact);
- ``oracle``: top-p on the target's own dense attention row (what a perfect draft would give);
- ``oracle_head``: the same per KV head (its query heads' rows averaged): one chunk set per KV head, the
  granularity Quest has, from perfect knowledge (the bound for per-head SpecAttn selection);
- ``streaming`` / ``quest``: :mod:`pipelines.baselines`, with the chunk count of a reference SpecAttn method.

A ``specattn`` / ``specattn_head`` method with ``draft_top_p`` takes its rows from a **sparse draft** (issue 24):
the decode queries drafted in blocks of ``draft_k`` from ``prefill`` on, each block's first forward dense and the
others reading, per draft layer with p < 1, the top-p chunks of that first forward's row
(:func:`pipelines.draft_tuning.sparse_draft_rows`); every query records its row over the chunks it read, as the
runtime's sparse draft forwards do (head-averaged draft selection for ``specattn``, per draft KV head for
``specattn_head``, as the runtime selects with and without a head map).

The target is loaded with ``attn_implementation="specattn_eval"`` (registered here); a forward call passes a
:class:`PassMasks` as ``specattn_eval=``. Batch 1, unpadded texts. Each layer follows its variant (sliding window,
soft-capping, sinks, scaling): the dense pass equals transformers' own attention, and a sparse selection is
intersected with the window (keys outside it are never read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from specattn_runtime.cache import preallocated_cache
from specattn_runtime.capture import AttentionRecorder, register_attention, softmax_attention
from specattn_runtime.selection import select_chunks
from specattn_runtime.variants import variant_of, visible

from .baselines import quest_mask, streaming_mask

ATTN_NAME = "specattn_eval"
KINDS = ("dense", "specattn", "specattn_head", "oracle", "oracle_head", "streaming", "quest")
GROUP_GLOBAL, GROUP_CALIBRATED = "SpecAttn global p", "SpecAttn calibrated"
GROUP_HEAD_GLOBAL, GROUP_HEAD_CALIBRATED = "SpecAttn per-head global p", "SpecAttn per-head calibrated"
GROUP_SPARSE_DRAFT = "SpecAttn calibrated, sparse draft"
GROUP_HEAD_SPARSE_DRAFT = "SpecAttn per-head calibrated, sparse draft"


@dataclass(frozen=True)
class Method:
    """One evaluated configuration.

    ``top_p``: per target layer (1.0 on dense layers) for ``specattn`` / ``oracle``. ``match``: the name of the
    ``specattn`` method whose per-(layer, query) chunk counts a ``streaming`` / ``quest`` method reuses.
    """

    name: str
    kind: str
    top_p: tuple[float, ...] = ()
    match: str | None = None
    head_map: tuple[tuple[int, ...], ...] = ()  # specattn_head: [layer][target KV head] -> draft KV head
    top_p_head: tuple[tuple[float, ...], ...] = ()  # specattn_head: p per (layer, KV head)
    group: str = ""  # curve the method belongs to in the trade-off plot
    x: float | None = None  # the swept value (p, recall budget) for reports
    in_table: bool = False  # a row of the headline table (the rest only feed the curves)
    draft_top_p: tuple[float, ...] = ()  # specattn / specattn_head: the draft drafts sparsely with these p
    draft_k: int = 4  # ... in blocks of this many drafts


@dataclass
class PassMasks:
    """What the target's attention does in one teacher-forced pass.

    ``chunks``: layer -> bool ``[T, C]`` chunk selection; ``quest_budget``: layer -> int64 ``[T]`` (Quest picks
    chunks inside attention, from the layer's own queries and keys). Layers in neither are dense. ``read``
    collects, per layer, the keys each query read (float ``[T]``, averaged over heads; in the dense pass: the keys
    visible, which a sliding window limits).
    """

    chunk_size: int
    chunks: dict[int, torch.Tensor] = field(default_factory=dict)
    quest_budget: dict[int, torch.Tensor] = field(default_factory=dict)
    recorder: AttentionRecorder | None = None
    read: dict[int, torch.Tensor] = field(default_factory=dict)


def token_mask(chunks: torch.Tensor, chunk_size: int, n_keys: int | None = None) -> torch.Tensor:
    """Chunk selection ``[..., Tq, C]`` -> causal key mask ``[..., Tq, n_keys]`` (key ``s`` read by query ``t``),
    the ``Tq`` queries being the last of ``n_keys`` positions (default ``n_keys = Tq``)."""
    tq = chunks.shape[-2]
    tk = tq if n_keys is None else n_keys
    return chunks.repeat_interleave(chunk_size, dim=-1)[..., :tk] & visible(tq, tk, None, chunks.device)


def _eval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    specattn_eval: PassMasks | None = None, **kwargs):
    # query [1, H, Tq, D]: the last Tq of the Tk positions in key/value [1, Hkv, Tk, D] (Tq < Tk after a cached
    # dense prefix); attention_mask ignored: batch 1, no padding, causal. The mask is rebuilt from the layer's
    # variant (window), so the dense pass is transformers' own attention.
    st, layer = specattn_eval, module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    variant = variant_of(kwargs)
    tq, tk = query.shape[2], key.shape[2]
    allowed = visible(tq, tk, variant.window, query.device)[None]  # [1, Tq, Tk]: what dense attention reads
    if st is not None and layer in st.chunks:
        chunks = st.chunks[layer]  # [Tq, C], or [H, Tq, C] per query head
        allowed = allowed & (token_mask(chunks, st.chunk_size, tk) if chunks.dim() == 3 else
                             token_mask(chunks, st.chunk_size, tk)[None])
    elif st is not None and layer in st.quest_budget:
        chunks = quest_mask(query[0], key[0], st.quest_budget[layer], st.chunk_size)  # [H, Tq, C]
        allowed = allowed & token_mask(chunks, st.chunk_size, tk)  # [H, Tq, Tk]
    if st is not None:
        st.read[layer] = allowed.sum(-1).float().mean(0)  # [Tq] keys read per query, averaged over heads
    if st is not None and st.recorder is not None and st.recorder.wants(layer):
        out, probs = softmax_attention(query, key, value, allowed[None], scale, variant)
        st.recorder.record(layer, probs, key.shape[1])  # the target's own rows: the oracles' input
        return out, None
    if variant.softcap is not None or variant.sinks is not None:  # SDPA has neither
        return softmax_attention(query, key, value, allowed[None], scale, variant)[0], None
    if tq == tk and allowed.shape[0] == 1 and variant.window is None and (st is None or layer not in st.chunks):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed[None], scale=scale,
                                             enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``"specattn_eval"`` with transformers (SDPA's mask builder; the mask is rebuilt here)."""
    return register_attention(ATTN_NAME, _eval_attention, mask="sdpa")


def topp_chunks(rows: torch.Tensor, p: float, prefill: int, chunk_size: int) -> torch.Tensor:
    """Top-p selection for every query: ``rows`` float ``[T, C]`` pooled attention -> bool ``[T, C]``.

    Queries before ``prefill`` read every visible chunk; the others follow the runtime's rule (sink and own
    chunk kept, the fewest largest chunks reaching mass ``p``).
    """
    t, c = rows.shape
    n_valid = torch.arange(t) // chunk_size + 1
    sel = n_valid[:, None] > torch.arange(c)[None, :]  # dense, causal at chunk level
    if prefill < t:
        sel[prefill:] = decode_chunks(rows[prefill:], p, prefill, chunk_size)
    return sel


def decode_chunks(rows: torch.Tensor, p: float, first: int, chunk_size: int) -> torch.Tensor:
    """Top-p selection for decode queries at positions ``first, first + 1, ...``: ``rows`` ``[Tq, C]`` -> bool
    ``[Tq, C]`` (p = 1: every visible chunk)."""
    n_valid = (first + torch.arange(rows.shape[0])) // chunk_size + 1
    if p >= 1.0:
        return n_valid[:, None] > torch.arange(rows.shape[1])[None, :]
    return select_chunks(rows, p, n_valid)


@dataclass
class WindowResult:
    """One method on one text: ``nll`` float64 ``[n_scored]`` (position ``prefill + i`` predicting the next token),
    ``read`` / ``avail`` float64 ``[n_layers]`` keys read / visible, summed over scored queries; ``chunks``
    float64 ``[n_layers]`` selected chunks summed over scored queries."""

    nll: torch.Tensor
    read: torch.Tensor
    avail: torch.Tensor
    chunks: torch.Tensor


def _nll(logits: torch.Tensor, ids: torch.Tensor, prefill: int, block: int = 256) -> torch.Tensor:
    # logits [T - prefill, V] of queries prefill .. T-1 -> float64 NLL of tokens prefill+1 .. T-1. In row blocks:
    # a float64 log-softmax of 2,047 x 152K logits (Qwen's vocabulary) alone would take 2.5 GB.
    targets = ids[prefill + 1 :]
    out = []
    for i in range(0, targets.numel(), block):
        tgt = targets[i : i + block]
        rows = logits[i : i + tgt.numel()].double()  # the last query predicts past the text: never scored
        out.append(rows.logsumexp(-1) - rows.gather(-1, tgt[:, None]).squeeze(-1))
    return torch.cat(out)


@torch.no_grad()
def evaluate_window(target, draft, ids: torch.Tensor, layer_map: list[int], methods: list[Method],
                    chunk_size: int, prefill: int, on_method=None) -> dict[str, WindowResult]:
    """Run every method on one text ``ids`` (int64 ``[T]``); models loaded with ``specattn_eval`` (target) and
    ``specattn_record`` (draft). ``on_method(name)`` is called after each pass (progress bars).

    The prefill is dense in every method, so its keys and values are too: the target runs it once into a cache
    and each method's pass runs only the ``T - prefill`` decode queries on top (the cache is cut back between
    passes). With a long prefill (a long context and a scored tail) most of every pass is saved.
    """
    t = ids.numel()
    if not 0 < prefill < t - 1:
        raise ValueError(f"prefill={prefill} must leave decode steps in a text of {t} tokens")
    n_layers = len(layer_map)
    sparse = [j for j, i in enumerate(layer_map) if i >= 0]
    tq = t - prefill  # decode queries prefill .. T-1; the last one predicts past the text and is not scored

    draft_rec = AttentionRecorder(torch.arange(prefill, t), chunk_size, layers={layer_map[j] for j in sparse},
                                  per_kv_head=any(m.kind == "specattn_head" for m in methods))
    draft(ids[None], specattn_recorder=draft_rec, use_cache=False, logits_to_keep=1)
    needs_oracle = any(m.kind in ("oracle", "oracle_head") for m in methods)
    target_rec = AttentionRecorder(torch.arange(tq), chunk_size, layers=set(sparse),
                                   per_kv_head=any(m.kind == "oracle_head" for m in methods)) if needs_oracle else None
    n_heads = target.config.num_attention_heads

    cache = preallocated_cache(n_layers, t)
    target(ids[None, :prefill], specattn_eval=PassMasks(chunk_size), past_key_values=cache, use_cache=True,
           logits_to_keep=1)

    def decode_pass(masks: PassMasks) -> torch.Tensor:
        cache.crop(prefill)  # drop the previous pass's decode keys
        return target(ids[None, prefill:], specattn_eval=masks, past_key_values=cache, use_cache=True).logits[0]

    dense_pass = PassMasks(chunk_size, recorder=target_rec)
    dense_nll = _nll(decode_pass(dense_pass), ids, prefill)  # not the logits: 1.2 GB per pass at Qwen's vocabulary
    if len(dense_pass.read) != n_layers:
        raise RuntimeError(f"the target's attention ran through specattn_eval in {len(dense_pass.read)} of "
                           f"{n_layers} layers: was it loaded with attn_implementation={ATTN_NAME!r}?")
    # keys visible to each scored query, per layer (a sliding-window layer sees at most its window)
    avail = torch.stack([dense_pass.read[j][:-1].double() for j in range(n_layers)])

    out: dict[str, WindowResult] = {}
    counts: dict[str, dict[int, torch.Tensor]] = {}  # specattn method -> layer -> chunks per decode query [Tq]
    sparse_rows: dict[tuple, dict[int, torch.Tensor]] = {}  # (draft p, k, per head) -> layer -> [Hkv, Tq, C]

    def draft_rows(m: Method) -> dict[int, torch.Tensor]:
        key = (m.draft_top_p, m.draft_k, m.kind == "specattn_head")
        if key not in sparse_rows:
            sparse_rows[key] = _sparse_draft_rows(draft, ids, prefill, m, chunk_size)
        return sparse_rows[key]

    for m in methods:
        masks = PassMasks(chunk_size)
        if m.kind in ("specattn", "oracle"):
            for j in sparse:
                if m.kind == "oracle":
                    rows = target_rec.rows[j][0]
                elif m.draft_top_p:
                    rows = draft_rows(m)[layer_map[j]].mean(0)  # equal KV groups: the mean over every head
                else:
                    rows = draft_rec.rows[layer_map[j]][0]
                masks.chunks[j] = decode_chunks(rows, m.top_p[j], prefill, chunk_size)
            counts[m.name] = {j: masks.chunks[j].sum(-1) for j in sparse}
        elif m.kind in ("oracle_head", "specattn_head"):
            for j in sparse:
                if m.kind == "oracle_head":
                    rows_ps = [(r, m.top_p[j]) for r in target_rec.rows_kv[j][0]]  # [Hkv] x [Tq, C]
                else:
                    draft_kv = draft_rows(m)[layer_map[j]] if m.draft_top_p else draft_rec.rows_kv[layer_map[j]][0]
                    rows_ps = [(draft_kv[h], m.top_p_head[j][g]) for g, h in enumerate(m.head_map[j])]
                per_kv = torch.stack([decode_chunks(r, p, prefill, chunk_size) for r, p in rows_ps])
                masks.chunks[j] = per_kv.repeat_interleave(n_heads // per_kv.shape[0], dim=0)  # [H, Tq, C]
            # matched baselines get the mean chunk count over heads, per query: the same KV on average
            counts[m.name] = {j: masks.chunks[j].sum(-1).double().mean(0).round().long() for j in sparse}
        elif m.kind in ("streaming", "quest"):
            if m.match not in counts:
                raise ValueError(f"{m.name}: matched method {m.match!r} must be an earlier specattn/oracle method")
            for j in sparse:
                if m.kind == "streaming":
                    masks.chunks[j] = streaming_mask(counts[m.match][j], chunk_size, t)
                else:
                    masks.quest_budget[j] = counts[m.match][j]
        elif m.kind != "dense":
            raise ValueError(f"unknown method kind {m.kind!r}; kinds are {KINDS}")
        nll = dense_nll if m.kind == "dense" else _nll(decode_pass(masks), ids, prefill)
        read = avail.clone()
        chunks = ((torch.arange(prefill, t - 1) // chunk_size) + 1).double().repeat(n_layers, 1)
        for j in sparse:
            if j in masks.read:
                read[j] = masks.read[j][:-1].double()
            if j in masks.chunks:
                chunks[j] = masks.chunks[j][..., :-1, :].sum(-1).double().reshape(-1, tq - 1).mean(0)
            elif j in masks.quest_budget:
                chunks[j] = masks.quest_budget[j][:-1].double()
        out[m.name] = WindowResult(nll, read.sum(-1), avail.sum(-1), chunks.sum(-1))
        if on_method is not None:
            on_method(m.name)
    return out


def _sparse_draft_rows(draft, ids: torch.Tensor, prefill: int, m: Method, chunk_size: int) -> dict:
    """The sparse draft's rows of the decode queries (:func:`pipelines.draft_tuning.sparse_draft_rows`), with the
    draft switched to the teacher-forced attention for the two passes and back to its recording one after."""
    from . import self_tuning
    from .draft_tuning import sparse_draft_rows

    before = draft.config._attn_implementation
    draft.set_attn_implementation(self_tuning.register())
    try:
        return sparse_draft_rows(draft, ids, prefill, m.draft_k, dict(enumerate(m.draft_top_p)), chunk_size,
                                 per_head=m.kind == "specattn_head")
    finally:
        draft.set_attn_implementation(before)


def summarize(results: list[dict[str, WindowResult]], methods: list[Method], layer_map: list[int]) -> dict:
    """Aggregate per-text results: perplexity, increase over dense, KV reduction (sparse / all layers), mean
    chunks per sparse layer, per-step mean NLL (for cumulative perplexity curves) and per-layer KV read."""
    sparse = [j for j, i in enumerate(layer_map) if i >= 0]
    rows = {}
    for m in methods:
        nll = torch.stack([r[m.name].nll for r in results])  # [texts, steps]
        read = sum(r[m.name].read for r in results)
        avail = sum(r[m.name].avail for r in results)
        chunks = sum(r[m.name].chunks for r in results) / (nll.shape[0] * nll.shape[1])
        rows[m.name] = {
            "kind": m.kind, "group": m.group, "x": m.x, "match": m.match, "in_table": m.in_table,
            "sparse_draft": bool(m.draft_top_p),
            "perplexity": math.exp(nll.mean().item()),
            "kv_reduction_sparse_layers": 1 - (read[sparse].sum() / avail[sparse].sum()).item() if sparse else 0.0,
            "kv_reduction_all_layers": 1 - (read.sum() / avail.sum()).item(),
            "mean_chunks_sparse_layers": chunks[sparse].mean().item() if sparse else float("nan"),
            "kv_read_per_layer": (read / avail).tolist(),
            "step_nll": nll.mean(0).tolist(),
        }
    dense = next((r["perplexity"] for r in rows.values() if r["kind"] == "dense"), None)
    for r in rows.values():
        r["perplexity_increase"] = r["perplexity"] / dense - 1 if dense else float("nan")
    return rows
