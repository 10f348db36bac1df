"""Self-speculation measured teacher-forced, and the per-layer budgets of a mode ``self`` artifact tuned on it.

At run time (:mod:`specattn_runtime.selfspec`) a dense verification of positions ``E - k - 1 .. E - 1`` leaves
``E`` positions cached; the model then drafts positions ``E .. E + k - 1``, each sparse layer reading, per KV head,
the top-p chunks of that verification's attention (over the first ``E`` keys) plus every key from ``E`` on. Here,
on a text window of ``T`` tokens:

1. the **dense pass** runs the model's own attention and keeps each layer's K/V, the logits of the last ``Q``
   positions and, for the last ``Q + k + 1`` queries, per-KV-head chunk-pooled attention rows;
2. the last ``Q`` positions are cut into blocks of ``k`` drafts; the block starting at ``E`` selects its chunks from
   the rows of ``E - k - 1 .. E - 1``, as the runtime would after accepting everything;
3. the **region pass** runs the model on the ``Q`` region tokens alone: a draft at ``E + s`` attends to the dense
   pass's K/V before ``E`` (what the verification wrote) and to this pass's own K/V from ``E`` to itself (what the
   earlier drafts of its block wrote), the sparse layers through the selection. Its logits against the dense ones
   give greedy agreement and ``1 - TV``, the acceptance probability of rejection sampling.

So every draft of a block is computed as the runtime computes it after a fully accepted block, with the text as
the drafted tokens (``tests/test_selfspec.py`` checks the logits against the runtime's draft forwards); with
every selection full the region pass is the dense pass. Baselines at the same chunk counts: StreamingLLM (sink +
recent: MagicDec's draft) and Quest (per-head key bounds), from :mod:`pipelines.baselines`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specattn_runtime.capture import register_attention, softmax_attention
from specattn_runtime.hooks import dense_attention
from specattn_runtime.pooling import pool_to_chunks
from specattn_runtime.selection import select_chunks
from specattn_runtime.variants import variant_of, visible

from .baselines import quest_mask, streaming_mask

ATTN_NAME = "specattn_self_tf"
RECALL_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)


@dataclass
class TFPass:
    """What the attention does in one teacher-forced pass (keyword ``specattn_tf=`` of the forward).

    Dense pass (``replay=False``): fills ``kv`` (layer -> K, V as attention sees them) and ``rows`` (layer ->
    float32 ``[Hkv, n_rows, C]``, the last ``n_rows`` queries). Region pass (``replay=True``): every layer attends
    to ``kv``; layers in ``chunks`` (bool ``[G, Q, C]``, ``G`` = 1 or ``Hkv``) read those chunks, layers in
    ``quest_budget`` (int64 ``[Q]``) Quest's picks; ``read`` collects per layer the share of the visible keys each
    query read (float ``[Q]``, mean over heads); with ``record``, ``rows`` collects per layer every region query's
    per-KV-head pooled attention over the keys it read (float32 ``[Hkv, Q, C]``: what a sparse forward records,
    its mass on the chunks it read; sparse drafting's rows for the target's selection, :mod:`.draft_tuning`).
    """

    chunk_size: int
    n_rows: int = 0
    replay: bool = False
    k: int = 1  # drafts per block (region pass)
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    chunks: dict[int, torch.Tensor] = field(default_factory=dict)
    quest_budget: dict[int, torch.Tensor] = field(default_factory=dict)
    read: dict[int, torch.Tensor] = field(default_factory=dict)
    record: bool = False  # region pass: keep each query's pooled rows in ``rows``


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               specattn_tf: TFPass | None = None, **kwargs):
    st, layer = specattn_tf, module.layer_idx
    if st is None or not st.replay:
        out = dense_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                              **kwargs)[0]
        if st is not None:
            st.kv[layer] = (key, value)
            if st.n_rows:
                st.rows[layer] = _pooled_rows(query, key, value, attention_mask, scaling, kwargs, st)
        return out, None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    variant = variant_of(kwargs)
    dense_k, dense_v = st.kv[layer]
    h, tq, tk, hkv = query.shape[1], query.shape[2], dense_k.shape[2], dense_k.shape[1]
    vis = visible(tq, tk, variant.window, query.device)  # [Q, T]: causal, within the layer's window
    pos = torch.arange(tk, device=query.device)
    block_start = tk - tq + (torch.arange(tq, device=query.device) // st.k) * st.k  # E of each region query
    # A draft at E + s reads the verified (dense) K/V before E and its own block's drafted K/V from E on: this
    # pass's keys and values of the region positions, as at run time.
    before = pos[None, :] < block_start[:, None]  # [Q, T]
    mask = vis & before  # dense keys
    own = vis[:, tk - tq :] & ~before[:, tk - tq :]  # this pass's keys (region positions)
    mask = torch.cat([mask, own], dim=-1)[None]  # [1, Q, T + Q]
    if layer in st.chunks or layer in st.quest_budget:
        chunks = st.chunks[layer] if layer in st.chunks else \
            quest_mask(query[0], dense_k[0], st.quest_budget[layer], st.chunk_size)
        keys = chunks.repeat_interleave(st.chunk_size, dim=-1)[..., :tk]  # [G, Q, T]
        mask = mask & torch.cat([keys, keys[..., tk - tq :]], dim=-1)
        st.read[layer] = (mask.sum(-1).double() / vis.sum(-1)).mean(0)
        if mask.shape[0] not in (1, h):  # per KV head: its query heads are consecutive
            mask = mask.repeat_interleave(h // hkv, dim=0)
    keys_all, values_all = torch.cat([dense_k, key], dim=2), torch.cat([dense_v, value], dim=2)
    out, probs = softmax_attention(query, keys_all, values_all, mask[None], scale, variant)
    if st.record:  # this pass's keys are the region positions tk - tq .. tk - 1: fold them back onto positions
        probs = probs[0].float()  # [H, Q, T + Q]
        by_pos = probs[..., :tk].clone()
        by_pos[..., tk - tq :] += probs[..., tk:]
        st.rows[layer] = pool_to_chunks(by_pos.view(hkv, h // hkv, tq, tk).mean(1), st.chunk_size)
    return out, None


def _pooled_rows(query, key, value, attention_mask, scaling, kwargs, st: TFPass) -> torch.Tensor:
    """Per-KV-head chunk-pooled attention of the last ``st.n_rows`` queries: float32 ``[Hkv, n_rows, C]``."""
    m = st.n_rows
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = attention_mask[..., -m:, :] if attention_mask is not None else None
    probs = softmax_attention(query[:, :, -m:], key, value, mask, scale, variant_of(kwargs))[1][0].float()
    h, hkv = probs.shape[0], key.shape[1]
    return pool_to_chunks(probs.view(hkv, h // hkv, m, -1).mean(1), st.chunk_size)


def register() -> str:
    """Register the teacher-forced attention with transformers (SDPA's mask builder); idempotent."""
    return register_attention(ATTN_NAME, _attention, mask="sdpa")


@dataclass
class DenseWindow:
    """The dense pass over one window: what every region pass of it needs."""

    ids: torch.Tensor  # int64 [T]
    logits: torch.Tensor  # float32 [Q, V]: the model's own next-token logits at the region positions
    rows: dict[int, torch.Tensor]  # sparse layer -> [Hkv, Q + k + 1, C]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    n_region: int
    k: int
    chunk_size: int


def region_size(window_tokens: int, queries: int, k: int) -> int:
    """Region queries per window: ``queries`` rounded down to whole blocks of ``k``; checked to fit the window."""
    q = (queries // k) * k
    if q < k or q + k + 1 >= window_tokens:
        raise ValueError(f"{queries} region queries per window need 1 <= queries // k and queries + k + 1 < the "
                         f"window of {window_tokens} tokens (k = {k})")
    return q


@torch.no_grad()
def dense_pass(model, ids: torch.Tensor, n_region: int, k: int, layers: list[int], chunk_size: int,
               logits_to_keep: int | None = None) -> DenseWindow:
    """The dense pass; ``logits_to_keep`` (default ``n_region``) fewer when only the K/V and rows are wanted
    (a float32 ``[Q, V]`` at a 152K vocabulary is 1.1 GB for 1,800 queries)."""
    st = TFPass(chunk_size, n_rows=n_region + k + 1)
    keep = n_region if logits_to_keep is None else logits_to_keep
    logits = model(ids[None], specattn_tf=st, use_cache=False, logits_to_keep=keep).logits[0].float()
    return DenseWindow(ids, logits, {j: st.rows[j] for j in layers}, st.kv, n_region, k, chunk_size)


@torch.no_grad()
def region_pass(model, dense: DenseWindow, chunks: dict[int, torch.Tensor] | None = None,
                quest_budget: dict[int, torch.Tensor] | None = None, rows: dict | None = None,
                logits_to_keep: int = 0) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Draft logits float32 ``[Q, V]`` at the region positions (the last ``logits_to_keep`` only, when > 0), and
    per layer the share of keys read ``[Q]``. A dict passed as ``rows`` receives every layer's pooled rows of the
    region queries (``TFPass.record``)."""
    t, q = dense.ids.numel(), dense.n_region
    st = TFPass(dense.chunk_size, replay=True, k=dense.k, kv=dense.kv, chunks=chunks or {},
                quest_budget=quest_budget or {}, record=rows is not None)
    pos = torch.arange(t - q, t, device=dense.ids.device)[None]
    logits = model(dense.ids[None, t - q :], position_ids=pos, specattn_tf=st, use_cache=False,
                   logits_to_keep=logits_to_keep).logits[0].float()
    if rows is not None:
        rows.update(st.rows)
    return logits, st.read


def verification_guided_chunks(rows: torch.Tensor, n_keys: int, n_region: int, k: int, p: float,
                               chunk_size: int, method: str = "threshold") -> torch.Tensor:
    """Chunks each region query's draft reads: bool ``[Hkv, Q, C]``.

    ``rows`` ``[Hkv, Q + k + 1, C]``: the last queries' per-KV-head pooled attention over ``n_keys`` keys. Query
    ``E + s`` of the block starting at ``E`` reads the top-p chunks (per KV head) of the rows ``E - k - 1 .. E - 1``
    over the first ``E`` keys, and every chunk from the one holding position ``E - 1`` on (causal).
    """
    hkv, r, c = rows.shape
    first_row, q0 = n_keys - r, n_keys - n_region
    starts = q0 + k * torch.arange(n_region // k, device=rows.device)  # block starts E
    idx = starts[:, None] - k - 1 + torch.arange(k + 1, device=rows.device)[None] - first_row  # [nb, k + 1]
    scores = rows[:, idx, :].sum(2).transpose(0, 1).reshape(-1, c)  # [nb * Hkv, C]
    n_valid = (starts + chunk_size - 1) // chunk_size  # chunks holding the first E keys
    sel = select_chunks(scores, p, n_valid.repeat_interleave(hkv), method=method).view(-1, hkv, c)
    cols = torch.arange(c, device=rows.device)
    sel = sel | (cols[None, None, :] >= n_valid[:, None, None])  # keys written since the verification
    per_query = sel[torch.arange(n_region, device=rows.device) // k].transpose(0, 1)  # [Hkv, Q, C]
    own = (q0 + torch.arange(n_region, device=rows.device)) // chunk_size
    return per_query & (cols[None, None, :] <= own[None, :, None])


def matched_budget(chunks: torch.Tensor) -> torch.Tensor:
    """Chunks per region query (mean over KV heads, rounded): what a baseline is given to read the same."""
    return chunks.sum(-1).double().mean(0).round().long().clamp_min(1)


def streaming_chunks(budget: torch.Tensor, n_keys: int, chunk_size: int) -> torch.Tensor:
    """StreamingLLM's draft (MagicDec): sink + recent chunks, ``budget`` per region query: bool ``[1, Q, C]``."""
    return streaming_mask(budget, chunk_size, n_keys)[None]


def recall_and_read(chunks: torch.Tensor, rows_q: torch.Tensor, n_keys: int, chunk_size: int,
                    which: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean attention mass of the queries' own dense rows ``[Hkv, Q, C]`` the chunks cover, and mean share of the
    causal keys they hold (chunk level, before any sliding window: the region pass measures the exact reads).
    ``which`` (bool ``[Q]``): average over those queries only (sparse drafting: the forwards that read sparsely)."""
    q = rows_q.shape[1]
    mass = rows_q.sum(-1).clamp_min(1e-30)
    pos = n_keys - q + torch.arange(q, device=rows_q.device)  # region positions
    starts = torch.arange(chunks.shape[-1], device=rows_q.device) * chunk_size
    tokens = (pos[:, None] + 1 - starts[None, :]).clamp(0, chunk_size)  # keys of each chunk visible to the query
    recall = (chunks * rows_q).sum(-1) / mass  # [Hkv, Q]
    read = (chunks * tokens[None]).sum(-1).double() / (pos + 1)[None]  # [G, Q]
    if which is not None:
        recall, read = recall[:, which], read[:, which]
    return recall.mean().item(), read.mean().item()


def acceptance(dense_logits: torch.Tensor, draft_logits: torch.Tensor, k: int,
               temperatures: tuple[float, ...] = (1.0,)) -> dict:
    """Per-block acceptance of ``k`` drafts: sums over blocks (so windows add up).

    ``greedy_len``: tokens a greedy step emits (leading argmax agreements + 1); ``agree[s]``: agreements at draft
    offset ``s``; per temperature ``tv_len`` (expected tokens per step under rejection sampling, acceptance
    ``1 - TV`` at each offset, independent across offsets given the text) and ``tv[s]``.
    """
    agree = (dense_logits.argmax(-1) == draft_logits.argmax(-1)).view(-1, k).double()  # [nb, k]
    out = {"blocks": agree.shape[0], "greedy_len": (1 + agree.cumprod(1).sum(1)).sum().item(),
           "agree": agree.sum(0).tolist()}
    for tau in temperatures:
        p = torch.softmax(dense_logits / tau, -1)
        q = torch.softmax(draft_logits / tau, -1)
        alpha = torch.minimum(p, q).sum(-1).double().view(-1, k)
        out[f"tv_len@{tau}"] = (1 + alpha.cumprod(1).sum(1)).sum().item()
        out[f"tv@{tau}"] = alpha.sum(0).tolist()
    return out


def add_stats(total: dict | None, new: dict) -> dict:
    """Sum two :func:`acceptance` / read dicts (numbers and per-offset lists)."""
    if total is None:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in new.items()}
    for key, v in new.items():
        total[key] = [a + b for a, b in zip(total[key], v)] if isinstance(v, list) else total[key] + v
    return total


def summarize(stats: dict, k: int, n_layers: int, sparse_layers: list[int]) -> dict:
    """Means from summed stats: accepted length, acceptance rate, draft KV read (sparse and all layers) and the
    objective, tokens per step over KV read per step in units of the whole cache (``k`` drafts + 1 dense
    verification): long-context decoding is bound by those bytes."""
    nb = stats["blocks"]
    read = [stats["read_sum"][i] / stats["read_n"] for i in range(len(sparse_layers))] if sparse_layers else []
    read_all = (sum(read) + (n_layers - len(sparse_layers))) / n_layers
    out = {"k": k, "blocks": nb, "mean_accepted_length": stats["greedy_len"] / nb,
           "acceptance_rate": sum(stats["agree"]) / (nb * k),
           "acceptance_by_offset": [a / nb for a in stats["agree"]],
           "draft_kv_read_sparse_layers": sum(read) / max(len(read), 1), "draft_kv_read_all_layers": read_all,
           "draft_kv_read_per_layer": read}
    for key in stats:
        if key.startswith("tv_len@"):
            tau = key.split("@")[1]
            out[f"mean_accepted_length_t{tau}"] = stats[key] / nb
            out[f"acceptance_rate_t{tau}"] = sum(stats[f"tv@{tau}"]) / (nb * k)
    out["tokens_per_kv_read"] = out["mean_accepted_length"] / (k * read_all + 1)
    return out


def measure(model, windows: list[DenseWindow], layers: list[int], chunk_fn, temperatures=(1.0,),
            progress=None) -> dict:
    """Summed acceptance and draft reads of one drafting method over windows. ``chunk_fn(window)`` returns
    ``(chunks, quest_budget)`` for :func:`region_pass`."""
    total = None
    for w in windows:
        chunks, quest = chunk_fn(w)
        logits, read = region_pass(model, w, chunks, quest)
        stats = acceptance(w.logits, logits, w.k, temperatures)
        stats["read_sum"] = [read[j].sum().item() if j in read else float(w.n_region) for j in layers]  # dense
        stats["read_n"] = w.n_region
        total = add_stats(total, stats)
        if progress is not None:
            progress.update(1)
    return total


def chunks_for(window: DenseWindow, layers: list[int], top_p: dict[int, float], method: str = "threshold") -> dict:
    """Verification-guided chunks of every sparse layer with ``p < 1`` (the others stay dense)."""
    t = window.ids.numel()
    return {j: verification_guided_chunks(window.rows[j], t, window.n_region, window.k, top_p[j],
                                          window.chunk_size, method) for j in layers if top_p[j] < 1.0}


def layer_curves(windows: list[DenseWindow], layers: list[int], p_grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per sparse layer and p: mean recall of the draft queries' own dense attention, and mean share of keys read
    (``[len(layers), len(p_grid)]`` each): cheap, from the dense pass alone, they turn a recall target into p."""
    recall = torch.zeros(len(layers), len(p_grid), dtype=torch.float64)
    read = torch.zeros_like(recall)
    for w in windows:
        t = w.ids.numel()
        for r, j in enumerate(layers):
            rows_q = w.rows[j][:, -w.n_region :]
            for c, p in enumerate(p_grid.tolist()):
                ch = verification_guided_chunks(w.rows[j], t, w.n_region, w.k, p, w.chunk_size)
                rc, rd = recall_and_read(ch, rows_q, t, w.chunk_size)
                recall[r, c] += rc / len(windows)
                read[r, c] += rd / len(windows)
    return recall, read


def p_for_recall(p_grid: torch.Tensor, recall: torch.Tensor, target: float) -> float:
    """Smallest p of the grid whose recall reaches ``target`` (1.0 when none does)."""
    ok = (recall >= target - 1e-9).nonzero()
    return float(p_grid[ok[0, 0]]) if ok.numel() else 1.0


def tune_self(model, windows: list[DenseWindow], layers: list[int], n_layers: int, p_grid: torch.Tensor,
              global_p: float | None = None, temperatures=(1.0,), progress: bool = True) -> dict:
    """Per-layer p maximising accepted tokens per KV read (:func:`summarize`), measured teacher-forced.

    Candidates: for each recall target of ``RECALL_GRID``, every layer's smallest p reaching it on the
    calibration windows (or the single ``global_p``). Returns the chosen ``top_p`` per sparse layer, every
    candidate's measured summary, and the per-layer curves."""
    from tqdm.auto import tqdm

    recall, read = layer_curves(windows, layers, p_grid)
    if global_p is not None:
        candidates = [(None, {j: float(global_p) for j in layers})]
    else:
        candidates, seen = [], set()
        for target in RECALL_GRID:
            ps = {j: p_for_recall(p_grid, recall[r], target) for r, j in enumerate(layers)}
            if tuple(ps.values()) not in seen:
                seen.add(tuple(ps.values()))
                candidates.append((target, ps))
    results = []
    k = windows[0].k
    with tqdm(total=len(candidates) * len(windows), desc="self-speculation (teacher-forced)", unit="pass",
              disable=not progress) as bar:
        for target, ps in candidates:
            total = measure(model, windows, layers, lambda w, ps=ps: (chunks_for(w, layers, ps), None),
                            temperatures, bar)
            results.append({"recall_target": target, "top_p": [ps[j] for j in layers],
                            **summarize(total, k, n_layers, layers)})
    best = max(range(len(results)), key=lambda i: results[i]["tokens_per_kv_read"])
    return {"top_p": dict(zip(layers, results[best]["top_p"])), "best": best, "candidates": results,
            "recall": recall, "read": read}
