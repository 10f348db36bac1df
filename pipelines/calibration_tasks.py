"""Tasks of the ``calibrate`` flow. Each takes paths, hashes and numbers (never tensors), so Prefect can key its
cache on the inputs; expensive results are written as safetensors under the work directory and passed as
:class:`~pipelines.file_results.FileRef` (path, size, sha256), which the cache checks before it reuses them.

The pure logic lives in :mod:`pipelines.corpus`, :mod:`pipelines.attention_stats`, :mod:`pipelines.alignment`,
:mod:`pipelines.topp_tuning` and :mod:`pipelines.draft_tuning`; these wrappers add I/O, caching, retries and logging.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from prefect import task
from safetensors.torch import load_file, save_file

from specattn_runtime.artifact import clean_stale_temps, temp_prefix
from specattn_runtime.fingerprint import model_fingerprint, tokenizer_hash
from specattn_runtime.models import check_model_dir, layer_windows_of, load_tokenizer, num_layers, special_prefix

from . import assets
from .alignment import align_heads, align_layers, map_cost
from .candidates import MIN_SPARSE_WINDOW
from .attention_stats import collect_pooled_attention, kl_matrix, query_positions, valid_chunks
from .corpus import split_documents, text_files, wiki_articles, windows_from_token_lists
from .file_results import CACHED, FileRef, file_ref
from .topp_tuning import LayerRows, recall_and_kv, recall_curves, tune_p

P_GRID = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 1.0])


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)  # what a killed writer left behind
    tmp = path.with_name(f"{temp_prefix(path)}tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


@task(retries=2, retry_delay_seconds=5)
def prepare_models(draft: str, target: str) -> dict:
    """Check both model directories, fingerprint them, and refuse pairs whose tokenizers differ."""
    d, t = check_model_dir(draft, "draft"), check_model_dir(target, "target")
    d_tok, t_tok = tokenizer_hash(d), tokenizer_hash(t)
    if d_tok != t_tok:
        raise ValueError(
            f"draft {d} and target {t} use different tokenizers (tokenizer hash {d_tok[:12]} vs {t_tok[:12]}); "
            "layer alignment compares attention position by position, so both must tokenize identically")
    return {role: {"path": str(p), "n_layers": num_layers(p), "windows": layer_windows_of(p), **model_fingerprint(p)}
            for role, p in (("draft", d), ("target", t))} | {"tokenizer_hash": t_tok}


def _documents(corpus: str | None) -> tuple[str, list[str]]:
    """``(name, documents)``: the shipped Wikipedia articles, or the .txt files at ``corpus`` via ``datasets``."""
    if corpus is None:
        dump = assets.fetch(assets.ENWIKI_BZ2)
        return "enwiki-gensim-4.4.0", [text for _, text in wiki_articles(dump)]
    from datasets import load_dataset

    files = text_files(corpus)
    ds = load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train")
    return Path(corpus).name, [row["text"] for row in ds]


@task(**CACHED)
def load_corpus(corpus: str | None, tokenizer_dir: str, tokenizer_hash: str, window_tokens: int,
                num_windows: int, holdout_windows: int, work_dir: str) -> dict:
    """Tokenize the corpus, split documents into calibration/holdout, cut windows; save them to one file."""
    name, docs = _documents(corpus)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus {corpus or name!r} is empty: no non-blank documents")
    sha = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    tok = load_tokenizer(tokenizer_dir)
    # Documents are text tokens, separated by EOS in the stream; each window then starts as the model's inputs
    # start at generation time (the tokenizer's BOS where it adds one): calibration measures that state.
    ids = [tok(d, add_special_tokens=False).input_ids for d in docs]
    prefix = special_prefix(tok)
    n_tokens = sum(map(len, ids))
    cal_idx, hold_idx = split_documents(len(ids), holdout_every=5)
    sep = tok.eos_token_id if tok.eos_token_id is not None else 0
    cal = windows_from_token_lists([ids[i] for i in cal_idx], window_tokens, num_windows, sep, prefix=prefix)
    hold = windows_from_token_lists([ids[i] for i in hold_idx], window_tokens, holdout_windows, sep, prefix=prefix)
    if cal.shape[0] == 0 or hold.shape[0] == 0:
        raise ValueError(
            f"corpus {corpus or name!r} is too short: {n_tokens} tokens in {len(docs)} documents give "
            f"{cal.shape[0]} calibration and {hold.shape[0]} holdout windows of {window_tokens} tokens; "
            "need at least one of each (use more text or a smaller window_tokens)")
    path = Path(work_dir) / f"windows-{_key(sha, tokenizer_hash, window_tokens, num_windows, holdout_windows)}.safetensors"
    _atomic_save({"calibration": cal, "holdout": hold}, path)
    windows_sha = hashlib.sha256(cal.numpy().tobytes() + b"|" + hold.numpy().tobytes()).hexdigest()
    return {"path": str(path), "file": file_ref(path), "windows_sha256": windows_sha, "name": name, "sha256": sha,
            "documents": len(docs), "tokens": n_tokens,
            "windows": cal.shape[0], "holdout_windows": hold.shape[0], "window_tokens": window_tokens,
            "window_prefix": prefix}


def shard_ranges(n_windows: int, windows_per_shard: int) -> list[tuple[int, int]]:
    """``[start, stop)`` window ranges of at most ``windows_per_shard`` windows covering ``n_windows``."""
    return [(s, min(s + windows_per_shard, n_windows)) for s in range(0, n_windows, windows_per_shard)]


# A model pass: where Dask workers declare resources ({"GPU": 1}), the flow routes these tasks with them.
@task(**CACHED, retries=2, retry_delay_seconds=2, task_run_name="attention-{role}-{split}-{start}:{stop}")
def collect_attention_shard(model: dict, windows_path: str, windows_sha: str, split: str, start: int, stop: int,
                            queries_per_window: int, chunk_size: int, role: str, work_dir: str) -> FileRef:
    """Pooled attention rows ``[n_layers, rows, n_chunks]`` of one model on windows ``[start, stop)`` of one split.

    Reads the windows from the shared work file (by path, not by value), loads the model once per worker process
    (kept for the worker's next shard of the same model) and writes only the pooled rows."""
    key = _key(model["weights_hash"], windows_sha, queries_per_window, chunk_size, start, stop)
    path = Path(work_dir) / f"attn-{role}-{split}-{start}-{stop}-{key}.safetensors"
    windows = load_file(windows_path)[split][start:stop]
    pos = query_positions(windows.shape[1], queries_per_window)
    rows, rows_kv = collect_pooled_attention(model["path"], windows, pos, chunk_size, role=f"{role}/{split}",
                                             progress=False, per_kv_head=True)
    return file_ref(_atomic_save({"rows": rows, "rows_kv": rows_kv}, path))


@task(**CACHED)
def merge_shards(shards: list[FileRef], windows_path: str, split: str, queries_per_window: int, chunk_size: int,
                 role: str, work_dir: str) -> FileRef:
    """One model's rows on one split, the shards concatenated in window order (the file the later steps read)."""
    parts = [load_file(p) for p in shards]
    rows = torch.cat([f["rows"] for f in parts], dim=1)
    rows_kv = torch.cat([f["rows_kv"] for f in parts], dim=2)
    windows = load_file(windows_path)[split]
    pos = query_positions(windows.shape[1], queries_per_window)
    path = Path(work_dir) / f"attn-{role}-{split}-{_key([s.sha256 for s in shards])}.safetensors"
    return file_ref(_atomic_save({"rows": rows, "rows_kv": rows_kv, "n_keys": (pos + 1).repeat(windows.shape[0]),
                                  "n_valid": valid_chunks(pos, chunk_size).repeat(windows.shape[0])}, path))


@task
def compute_kl(target_rows: str, draft_rows: str, eps: float = 1e-6) -> list[list[float]]:
    t, d = load_file(target_rows), load_file(draft_rows)
    return kl_matrix(t["rows"], d["rows"], t["n_valid"], eps).tolist()


@task
def align(kl: list[list[float]], dense_layers: int, also_dense: list[int] = ()) -> dict:
    """The monotone layer map; the first ``dense_layers`` and the ``also_dense`` target layers stay dense."""
    kl_t = torch.tensor(kl)
    layer_map = align_layers(kl_t, dense_layers, also_dense)
    return {"layer_map": layer_map, "cost": map_cost(kl_t, layer_map)}


def _layer_rows(target_rows: str, draft_rows: str, layer_map: list[int]) -> list[LayerRows | None]:
    t, d = load_file(target_rows), load_file(draft_rows)
    return [None if i < 0 else LayerRows(d["rows"][i], t["rows"][j], t["n_valid"], t["n_keys"])
            for j, i in enumerate(layer_map)]


@task
def tune_top_p(target_rows: str, draft_rows: str, layer_map: list[int], recall_budget: float,
               global_p: float | None, chunk_size: int) -> dict:
    """Per-layer p (or one global p) and the calibration-split recall curves for reports."""
    rows = _layer_rows(target_rows, draft_rows, layer_map)
    top_p, recall, kv = [], [], []
    for r in rows:
        if r is None:
            p, rc, k = 1.0, 1.0, 1.0
        elif global_p is not None:
            p, (rc, k) = global_p, recall_and_kv(r, global_p, chunk_size)
        else:
            p, rc, k = tune_p(r, recall_budget, chunk_size)
        top_p.append(p)
        recall.append(rc)
        kv.append(k)
    curve_recall, curve_kv = recall_curves(rows, P_GRID, chunk_size)
    return {"top_p": top_p, "recall": recall, "kv_fraction": kv,
            "curves": {"p_grid": P_GRID.tolist(), "recall": curve_recall.tolist(), "kv_fraction": curve_kv.tolist()}}


@task
def align_kv_heads(target_rows: str, draft_rows: str, layer_map: list[int]) -> dict:
    """Per sparse target layer, the draft KV head (of its aligned draft layer) guiding each target KV head, by KL
    of their per-head chunk-pooled attention; ``-1`` rows for dense layers."""
    t, d = load_file(target_rows), load_file(draft_rows)
    hkv = t["rows_kv"].shape[1]
    head_map, cost = [], 0.0
    for j, i in enumerate(layer_map):
        if i < 0:
            head_map.append([-1] * hkv)
            continue
        kl = kl_matrix(t["rows_kv"][j], d["rows_kv"][i], t["n_valid"])  # [Hkv_t, Hkv_d]
        heads = align_heads(kl)
        head_map.append(heads)
        cost += float(sum(kl[g, h] for g, h in enumerate(heads)))
    return {"head_map": head_map, "cost": cost}


def _head_rows(target_rows: str, draft_rows: str, layer_map: list[int], head_map: list[list[int]]):
    """``[layer][target KV head] -> LayerRows`` (``None`` for dense layers)."""
    t, d = load_file(target_rows), load_file(draft_rows)
    return [None if i < 0 else [LayerRows(d["rows_kv"][i][h], t["rows_kv"][j][g], t["n_valid"], t["n_keys"])
                                for g, h in enumerate(head_map[j])]
            for j, i in enumerate(layer_map)]


@task
def tune_top_p_heads(target_rows: str, draft_rows: str, layer_map: list[int], head_map: list[list[int]],
                     recall_budget: float, global_p: float | None, chunk_size: int) -> dict:
    """Per (layer, KV head) p: the smallest whose selection on the mapped draft head keeps ``recall_budget`` of the
    target head's attention (or ``global_p`` everywhere); the per-head recall and KV read at it."""
    top_p, recall, kv = [], [], []
    for heads in _head_rows(target_rows, draft_rows, layer_map, head_map):
        hkv = len(head_map[0])
        if heads is None:
            top_p.append([1.0] * hkv)
            recall.append([1.0] * hkv)
            kv.append([1.0] * hkv)
            continue
        tuned = [(global_p, *recall_and_kv(r, global_p, chunk_size)) if global_p is not None else
                 tune_p(r, recall_budget, chunk_size) for r in heads]
        top_p.append([x[0] for x in tuned])
        recall.append([x[1] for x in tuned])
        kv.append([x[2] for x in tuned])
    return {"top_p": top_p, "recall": recall, "kv_fraction": kv}


@task
def evaluate_holdout_heads(target_rows: str, draft_rows: str, layer_map: list[int], head_map: list[list[int]],
                           top_p_head: list[list[float]], chunk_size: int) -> dict:
    """Per-head selection on held-out text: recall and KV read per layer (means over its KV heads)."""
    recall, kv = [], []
    for heads, ps in zip(_head_rows(target_rows, draft_rows, layer_map, head_map), top_p_head):
        stats = [(1.0, 1.0)] if heads is None else [recall_and_kv(r, p, chunk_size) for r, p in zip(heads, ps)]
        recall.append(sum(s[0] for s in stats) / len(stats))
        kv.append(sum(s[1] for s in stats) / len(stats))
    return _holdout_summary(recall, kv, layer_map)


@task
def evaluate_holdout(target_rows: str, draft_rows: str, layer_map: list[int], top_p: list[float],
                     chunk_size: int) -> dict:
    """Recall and KV read on held-out text with the tuned thresholds (what the runtime would do)."""
    recall, kv = [], []
    for r, p in zip(_layer_rows(target_rows, draft_rows, layer_map), top_p):
        rc, k = (1.0, 1.0) if r is None else recall_and_kv(r, p, chunk_size)
        recall.append(rc)
        kv.append(k)
    return _holdout_summary(recall, kv, layer_map)


def _holdout_summary(recall: list[float], kv: list[float], layer_map: list[int]) -> dict:
    sparse = [j for j, i in enumerate(layer_map) if i >= 0]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "recall_per_layer": recall, "kv_fraction_per_layer": kv,
        "mean_recall_sparse_layers": mean([recall[j] for j in sparse]),
        "min_recall_sparse_layers": min((recall[j] for j in sparse), default=float("nan")),
        "kv_reduction_sparse_layers": 1 - mean([kv[j] for j in sparse]),
        "kv_reduction_all_layers": 1 - mean(kv),
    }


DRAFT_TEMPERATURES = (1.0,)  # rejection sampling's acceptance reported beside greedy (tuning uses greedy)


@task(**CACHED)
def tune_draft_top_p(models: dict, windows: FileRef, draft_k: int, queries_per_window: int, chunk_size: int,
                     draft_dense_layers: int, budget: float, per_head: bool = True,
                     min_sparse_window: int = MIN_SPARSE_WINDOW) -> dict:
    """Sparse drafting: the draft's own p per layer (:func:`pipelines.draft_tuning.tune_draft`) on the calibration
    windows, then dense and sparse drafting measured again on the holdout windows. Keyed on the models' hashes and
    the windows file's content (a :class:`FileRef`); the result is numbers only."""
    from specattn_runtime.models import load_causal_lm

    from . import draft_tuning as D
    from . import self_tuning as S

    draft = load_causal_lm(models["draft"]["path"], role="draft", attn_implementation=S.register())
    target = load_causal_lm(models["target"]["path"], role="target")
    n_d = draft.config.num_hidden_layers
    win = load_file(windows)
    n_region = S.region_size(win["calibration"].shape[1], queries_per_window, draft_k)

    def passes(split: str) -> list:
        return [D.draft_window(draft, target, w, n_region, draft_k, list(range(n_d)), chunk_size)
                for w in win[split]]

    tuned = D.tune_draft(draft, passes("calibration"), n_d, draft_dense_layers, P_GRID, budget, per_head,
                         DRAFT_TEMPERATURES, progress=False, min_sparse_window=min_sparse_window)
    hold = passes("holdout")
    ps = dict(enumerate(tuned["top_p"]))
    summary = lambda top_p: D.summarize(D.measure(draft, hold, n_d, top_p, per_head, DRAFT_TEMPERATURES),  # noqa: E731
                                        draft_k, n_d)
    dense_h, sparse_h = summary(None), summary(ps if min(ps.values()) < 1.0 else None)
    return {"top_p": tuned["top_p"], "best": tuned["best"], "n_region": n_region, "k": draft_k,
            "per_head": per_head, "dense_layers": draft_dense_layers, "budget": budget,
            "window_dense_layers": tuned["window_dense_layers"],
            "calibration": {"dense": tuned["dense"], "candidates": tuned["candidates"]},
            "holdout": {"dense": dense_h, "sparse": sparse_h,
                        "accepted_length_ratio": sparse_h["mean_accepted_length"] / dense_h["mean_accepted_length"]},
            "curves": {"recall": tuned["recall"].tolist(), "read": tuned["read"].tolist(), "layers": tuned["layers"]}}
