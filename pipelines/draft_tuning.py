"""Sparse drafting (mode ``draft``, schema 3) measured teacher-forced, and the draft's own per-layer p tuned on it.

At run time (issue 24) a step with ``L`` positions cached drafts ``k`` tokens in ``k`` draft forwards. Forward 0
is dense over positions ``L - 1`` and ``L`` and records, in every draft layer with ``p < 1``, the chunk-pooled
attention of query ``L`` (head-averaged; with a per-KV-head artifact one row per draft KV head, its query heads
averaged). Each such layer (head) keeps the top-p chunks of that row over the chunks ``< ceil((L + k) / C)``, the
sink and every chunk from ``(L - 1) // C`` on forced (``select_chunks(..., keep_recent=...)``); forwards
``1 .. k - 1`` (positions ``L + 1 .. L + k - 1``) read only those chunks in those layers. Here, on a text window,
with the pieces of :mod:`pipelines.self_tuning`:

1. the draft's **dense pass** (:func:`~pipelines.self_tuning.dense_pass`): its K/V, its logits and per-KV-head
   pooled rows of the last ``Q + k + 1`` queries; and the **target's** next-token logits at the ``Q`` region
   positions, the tokens acceptance is measured against (greedy agreement of the argmaxes, ``1 - TV`` of the
   distributions for rejection sampling);
2. the region is cut into blocks of ``k`` starting at ``E``: query ``E`` is forward 0 (dense: with dense keys before
   it, its row is the dense pass's row at ``E``), queries ``E + 1 .. E + k - 1`` read the selection made from it;
3. the **region pass** (:func:`~pipelines.self_tuning.region_pass`): a draft at ``E + s`` attends to the dense
   pass's K/V before ``E`` and to this pass's own K/V from ``E`` on, reading the selected chunks.

What the measurement leaves out, on purpose: at run time the K/V of accepted drafts ``E + 1 .. E + a - 1`` stay in
the draft's cache as their sparse forwards wrote them (the next step's forward 0 rewrites only ``L - 1`` and
``L``), while here every key before ``E`` is the dense pass's; and the target here is dense (its SpecAttn
verification moves acceptance a little, for dense and sparse drafting alike). The issue's runtime test (teacher-forced
acceptance = measured acceptance) says how far that goes.

Tuning (:func:`tune_draft`): the first ``dense_layers`` draft layers stay dense, and so do layers with a short
sliding window (:mod:`pipelines.candidates`); for each recall target of
:data:`~pipelines.self_tuning.RECALL_GRID`, every other layer takes the smallest p of the grid whose selection keeps
that share of its sparse forwards' own dense attention; each candidate's greedy accepted length is measured; the
candidate that reads the least draft KV while keeping ``>= (1 - budget)`` of the dense draft's accepted length wins
(all dense when none does, which always qualifies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specattn_runtime.selection import select_chunks
from specattn_runtime.variants import layer_windows

from . import self_tuning as S
from .candidates import MIN_SPARSE_WINDOW, short_window_layers, sparse_candidates


def block_starts(first: int, n_region: int, k: int, device=None) -> torch.Tensor:
    """Positions ``E`` of the draft blocks over region positions ``first .. first + n_region - 1`` (int64 ``[nb]``;
    the last block may be cut short)."""
    return first + k * torch.arange(-(-n_region // k), device=device)


def draft_guided_chunks(rows: torch.Tensor, n_keys: int, n_region: int, k: int, p: float, chunk_size: int,
                        per_head: bool = True, method: str = "threshold") -> torch.Tensor:
    """Chunks each region query of sparse drafting reads: bool ``[G, Q, C]`` (``G`` = Hkv per head, else 1).

    ``rows`` ``[Hkv, R, C]``: per-KV-head pooled attention of the last ``R >= Q`` of ``n_keys`` queries (the dense
    pass's). Block start ``E`` (forward 0) reads every chunk it can see; ``E + s`` (``s >= 1``) reads the top-p
    chunks of row ``E`` (per KV head, or of its head average) over chunks ``< ceil((E + k) / C)`` with the sink and
    every chunk from ``(E - 1) // C`` on kept, and nothing past its own chunk (causal).
    """
    hkv, r, c = rows.shape
    q0 = n_keys - n_region
    dev = rows.device
    starts = block_starts(q0, n_region, k, dev)  # [nb]
    scores = rows[:, starts - (n_keys - r), :]  # [Hkv, nb, C]
    if not per_head:
        scores = scores.mean(0, keepdim=True)  # equal groups: the mean of group means is the mean over all heads
    g, nb = scores.shape[0], starts.numel()
    # chunks holding the keys of the whole block (the window's end cuts the last one), and how many newest ones
    # are forced: every chunk from the one holding position E - 1 on (forward 0 wrote E - 1 and E)
    n_valid = ((starts + k + chunk_size - 1) // chunk_size).clamp_max(c)
    recent = n_valid - (starts - 1) // chunk_size
    flat = scores.transpose(0, 1).reshape(nb * g, c)  # [nb * G, C]
    nv = n_valid.repeat_interleave(g)
    sel = torch.zeros_like(flat, dtype=torch.bool)
    # select_chunks takes one keep_recent per call: the blocks fall into at most a few groups of it
    for kr in recent.unique().tolist():
        rows_kr = (recent == kr).repeat_interleave(g)
        sel[rows_kr] = select_chunks(flat[rows_kr], p, nv[rows_kr], method=method, keep_recent=int(kr))
    sel = sel.view(nb, g, c)
    cols = torch.arange(c, device=dev)
    i = torch.arange(n_region, device=dev)
    per_query = sel[i // k].transpose(0, 1).clone()  # [G, Q, C]
    per_query[:, i % k == 0] = True  # forward 0 is dense
    own = (q0 + i) // chunk_size
    return per_query & (cols[None, None, :] <= own[None, :, None])


def sparse_forwards(n_region: int, k: int, device=None) -> torch.Tensor:
    """bool ``[Q]``: the region queries drafted by a sparse forward (not a block's first)."""
    return torch.arange(n_region, device=device) % k != 0


@dataclass
class DraftWindow:
    """One window: the draft's dense pass and the target's logits at the same region positions."""

    dense: S.DenseWindow
    target_logits: torch.Tensor  # float32 [Q, V]


@torch.no_grad()
def draft_window(draft, target, ids: torch.Tensor, n_region: int, k: int, layers: list[int],
                 chunk_size: int) -> DraftWindow:
    """Dense pass of ``draft`` (loaded with :func:`pipelines.self_tuning.register`) and ``target``'s logits."""
    dense = S.dense_pass(draft, ids, n_region, k, layers, chunk_size)
    tl = target(ids[None], use_cache=False, logits_to_keep=n_region).logits[0].float()
    return DraftWindow(dense, tl)


def chunks_for(window: S.DenseWindow, top_p: dict[int, float], per_head: bool = True,
               method: str = "threshold") -> dict[int, torch.Tensor]:
    """Sparse drafting's chunks of every draft layer with ``p < 1`` (the others read densely)."""
    t = window.ids.numel()
    return {j: draft_guided_chunks(window.rows[j], t, window.n_region, window.k, p, window.chunk_size, per_head,
                                   method) for j, p in top_p.items() if p < 1.0}


def measure(draft, windows: list[DraftWindow], n_layers: int, top_p: dict[int, float] | None,
            per_head: bool = True, temperatures=(1.0,), progress=None) -> dict:
    """Summed acceptance against the target and draft reads over ``windows``: dense drafting when ``top_p`` is
    ``None`` (the dense pass's logits, no further pass), else sparse drafting with ``top_p`` per draft layer.

    Besides :func:`pipelines.self_tuning.acceptance`'s sums: ``read_sum`` (per draft layer, summed over region
    queries, share of the visible keys read), ``sparse_read_sum`` (the same over the sparse forwards only) and
    ``same_as_dense`` (per offset, drafts whose argmax is the dense draft's)."""
    total = None
    for w in windows:
        d = w.dense
        sparse_q = sparse_forwards(d.n_region, d.k, d.ids.device)
        chunks = {} if top_p is None else chunks_for(d, top_p, per_head)
        logits, read = (d.logits, {}) if not chunks else S.region_pass(draft, d, chunks)
        stats = S.acceptance(w.target_logits, logits, d.k, temperatures)
        # fidelity to dense drafting, per draft offset: what a draft that rarely predicts the target (the quick
        # pair's early exit) still shows of the sparse reading's effect
        stats["same_as_dense"] = (logits.argmax(-1) == d.logits.argmax(-1)).view(-1, d.k).double().sum(0).tolist()
        stats["read_sum"] = [read[j].sum().item() if j in read else float(d.n_region) for j in range(n_layers)]
        stats["sparse_read_sum"] = [read[j][sparse_q].sum().item() if j in read else float(sparse_q.sum())
                                    for j in range(n_layers)]
        stats["read_n"], stats["sparse_read_n"] = d.n_region, int(sparse_q.sum())
        total = S.add_stats(total, stats)
        if progress is not None:
            progress.update(1)
    return total


def summarize(stats: dict, k: int, n_layers: int) -> dict:
    """Means from :func:`measure`'s sums: accepted length (greedy, and per temperature under rejection sampling),
    acceptance by offset, and the draft's KV read: over all ``k`` forwards and over the ``k - 1`` sparse ones
    (all draft layers, dense ones counted as reading everything; ``*_per_layer`` per draft layer)."""
    out = S.summarize(stats, k, n_layers, list(range(n_layers)))
    for key in ("tokens_per_kv_read", "draft_kv_read_sparse_layers"):  # self-speculation's terms
        out.pop(key)
    n = max(stats["sparse_read_n"], 1)
    sparse = [v / n for v in stats["sparse_read_sum"]]
    out["draft_kv_read_sparse_forwards"] = sum(sparse) / n_layers
    # share of the sparse forwards' argmax equal to the dense draft's (offset 0 is dense: always equal)
    out["same_as_dense_draft"] = sum(stats["same_as_dense"][1:]) / max(stats["blocks"] * (k - 1), 1)
    out["draft_kv_read_sparse_forwards_per_layer"] = sparse
    return out


def layer_curves(windows: list[DraftWindow], layers: list[int], p_grid: torch.Tensor,
                 per_head: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per draft layer and p: mean recall of the sparse forwards' own dense attention and mean share of the keys
    they read (``[len(layers), len(p_grid)]`` each), from the dense passes alone: they turn a recall target into p."""
    recall = torch.zeros(len(layers), len(p_grid), dtype=torch.float64)
    read = torch.zeros_like(recall)
    for w in windows:
        d = w.dense
        t = d.ids.numel()
        which = sparse_forwards(d.n_region, d.k, d.ids.device)
        for r, j in enumerate(layers):
            rows_q = d.rows[j][:, -d.n_region :]
            for c, p in enumerate(p_grid.tolist()):
                ch = draft_guided_chunks(d.rows[j], t, d.n_region, d.k, p, d.chunk_size, per_head)
                rc, rd = S.recall_and_read(ch, rows_q, t, d.chunk_size, which)
                recall[r, c] += rc / len(windows)
                read[r, c] += rd / len(windows)
    return recall, read


def choose(candidates: list[dict], dense_length: float, budget: float) -> int:
    """Index of the candidate reading the least draft KV (all forwards) among those whose greedy accepted length
    is ``>= (1 - budget) * dense_length``; ties go to the longer accepted length. Raises if none qualifies (the
    all-dense candidate always should: pass it)."""
    if not 0.0 <= budget < 1.0:
        raise ValueError(f"the acceptance budget (allowed loss of accepted length vs dense drafting, a fraction) "
                         f"must lie in [0, 1), got {budget}")
    ok = [i for i, c in enumerate(candidates) if c["mean_accepted_length"] >= (1 - budget) * dense_length - 1e-12]
    if not ok:
        raise ValueError(f"no candidate keeps {1 - budget:.0%} of the dense draft's accepted length "
                         f"{dense_length:.3f}: include the all-dense candidate")
    return min(ok, key=lambda i: (candidates[i]["draft_kv_read_all_layers"], -candidates[i]["mean_accepted_length"]))


def tune_draft(draft, windows: list[DraftWindow], n_layers: int, dense_layers: int, p_grid: torch.Tensor,
               budget: float, per_head: bool = True, temperatures=(1.0,), progress: bool = True,
               min_sparse_window: int = MIN_SPARSE_WINDOW) -> dict:
    """The draft's per-layer p (see the module docstring for the rule), measured teacher-forced. The first
    ``dense_layers`` and the layers with a window shorter than ``min_sparse_window`` (:mod:`pipelines.candidates`)
    draft densely.

    Returns ``top_p`` (list, one per draft layer), the dense draft's summary, every candidate's (with its
    ``recall_target`` and ``top_p``), ``best`` (index), the per-layer curves (``recall``, ``read``) of the tuned
    ``layers`` and the ``window_dense_layers``."""
    from tqdm.auto import tqdm

    if not 0 <= dense_layers <= n_layers:
        raise ValueError(f"draft dense_layers={dense_layers} must lie in [0, {n_layers}] (the draft's layers)")
    windows_per_layer = layer_windows(draft.config)
    layers = sparse_candidates(windows_per_layer, dense_layers, min_sparse_window)
    k = windows[0].dense.k
    dense = summarize(measure(draft, windows, n_layers, None, per_head, temperatures), k, n_layers)
    recall, read = layer_curves(windows, layers, p_grid, per_head)
    candidates, seen = [], set()
    for target in S.RECALL_GRID:
        ps = [1.0] * n_layers
        for r, j in enumerate(layers):
            ps[j] = S.p_for_recall(p_grid, recall[r], target)
        if tuple(ps) not in seen:
            seen.add(tuple(ps))
            candidates.append((target, ps))
    results = []
    with tqdm(total=len(candidates) * len(windows), desc="sparse drafting (teacher-forced)", unit="pass",
              disable=not progress) as bar:
        for target, ps in candidates:
            if all(p >= 1.0 for p in ps):  # dense drafting: measured above
                summary = dict(dense)
                bar.update(len(windows))
            else:
                total = measure(draft, windows, n_layers, dict(enumerate(ps)), per_head, temperatures, bar)
                summary = summarize(total, k, n_layers)
            results.append({"recall_target": target, "top_p": ps, **summary})
    if not any(all(p >= 1.0 for p in c["top_p"]) for c in results):  # the fallback must be on the list
        results.append({"recall_target": None, "top_p": [1.0] * n_layers, **dense})
    best = choose(results, dense["mean_accepted_length"], budget)
    return {"top_p": results[best]["top_p"], "best": best, "dense": dense, "candidates": results,
            "recall": recall, "read": read, "layers": layers,
            "window_dense_layers": short_window_layers(windows_per_layer, min_sparse_window)}


@torch.no_grad()
def sparse_draft_rows(draft, ids: torch.Tensor, first: int, k: int, top_p: dict[int, float], chunk_size: int,
                      per_head: bool = True) -> dict[int, torch.Tensor]:
    """Rows the sparse draft records for the target's selection, for queries ``first .. T - 1`` of ``ids``
    (``[T]``), drafted in blocks of ``k`` from ``first`` on: per draft layer, float32 ``[Hkv, T - first, C]`` per
    KV head (a block's first query: its dense row; the others: their mass over the chunks they read). Every layer:
    a layer that reads densely still sees the hidden states of the sparse layers below it. ``draft`` loaded with
    :func:`pipelines.self_tuning.register`."""
    t = ids.numel()
    n_region = t - first
    if first < k + 1 or n_region < 1:
        raise ValueError(f"sparse-draft rows need k + 1 = {k + 1} <= first = {first} < T = {t}")
    dense = S.dense_pass(draft, ids, n_region, k, [j for j, p in top_p.items() if p < 1.0], chunk_size,
                         logits_to_keep=1)
    rows: dict[int, torch.Tensor] = {}
    S.region_pass(draft, dense, chunks_for(dense, top_p, per_head), rows=rows, logits_to_keep=1)
    return rows
