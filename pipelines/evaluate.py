"""The ``evaluate`` flow: how much KV can SpecAttn skip, and what does it cost in perplexity?

An artifact, its model pair and long book text in; per method perplexity, increase over dense, KV reduction and
chunks read out, as JSON + a markdown table (the paper's Table 1) + a trade-off PNG + Prefect artifacts. The
protocol and the teacher-forced passes are in :mod:`pipelines.sparse_eval`; the methods:

- rows of the table: dense; StreamingLLM and Quest with the chunk counts of calibrated SpecAttn; oracle top-p
  with the calibrated p; SpecAttn with one global p (default 0.95 / 0.97 / 0.99, the paper's rows); SpecAttn
  with the artifact's calibrated per-layer p;
- curves (``--quick`` skips them): calibrated SpecAttn with matched StreamingLLM / Quest at further recall
  budgets, whose per-layer p is read off the artifact's calibration recall curves (:func:`p_for_recall`), plus
  global p = 0.9;
- with an artifact that drafts sparsely (``draft_top_p``, schema 3): calibrated SpecAttn (per layer, and per KV
  head where the artifact has a head map) again, its selections taken from the rows the sparse draft records, beside
  the dense-draft rows (the draft's k: the one its p were tuned for).

Run: ``python -m pipelines.evaluate`` (see ``--help``); ``bash scripts/evaluate.sh`` sets everything up first.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from tqdm.auto import tqdm

from specattn_runtime import capture
from specattn_runtime.artifact import Artifact, load_artifact
from specattn_runtime.models import check_model_dir, load_causal_lm, load_tokenizer, num_layers
from specattn_runtime.runtime import check_against_models
from specattn_runtime.variants import check_supported

from . import quality_report, sparse_eval
from .calibration_tasks import shard_ranges
from .collect import annotate, check_cluster_params, parse_resources, task_runner, wait_with_progress
from .eval_text import evaluation_windows, load_books
from .file_results import CACHED
from .presets import check_pair, resolve_pair
from .sparse_eval import (GROUP_CALIBRATED, GROUP_GLOBAL, GROUP_HEAD_CALIBRATED, GROUP_HEAD_GLOBAL,
                          GROUP_HEAD_SPARSE_DRAFT, GROUP_SPARSE_DRAFT, Method)

DEFAULT_GLOBAL_P = (0.95, 0.97, 0.99)
DEFAULT_CURVE_BUDGETS = (0.85, 0.98)
HEAD_CURVE_P = (0.8, 0.9, 0.95, 0.97, 0.99)  # per-head curve points of a full run
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def p_for_recall(p_grid: torch.Tensor, recall: torch.Tensor, budget: float) -> float:
    """Smallest ``p`` whose calibration recall reaches ``budget``, linearly interpolated on the grid.

    ``p_grid`` ``[G]`` increasing; ``recall`` ``[G]`` (non-decreasing in p). Budgets below the grid's first
    recall give the first p; a budget never reached gives 1.0 (dense).
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"recall budget must lie in (0, 1], got {budget}")
    above = (recall >= budget).nonzero()
    if above.numel() == 0:
        return 1.0
    k = int(above[0])
    if k == 0:
        return float(p_grid[0])
    r0, r1, p0, p1 = float(recall[k - 1]), float(recall[k]), float(p_grid[k - 1]), float(p_grid[k])
    return p1 if r1 <= r0 else p0 + (p1 - p0) * (budget - r0) / (r1 - r0)


def build_methods(art: Artifact, global_p: tuple[float, ...], curve_budgets: tuple[float, ...],
                  quick: bool = False) -> list[Method]:
    """The evaluated methods, in run order (a matched baseline follows the SpecAttn method it copies)."""
    for p in global_p:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"global p must lie in (0, 1], got {p}")
    layer_map = art.layer_map.tolist()
    dense_p = lambda p: tuple(1.0 if i < 0 else float(p) for i in layer_map)  # noqa: E731
    objective = art.info("objective")
    own_budget = float(objective.get("recall_budget") or 0.0)
    calibrated = {own_budget: tuple(art.top_p.tolist())}
    if not quick and {"p_grid", "recall"} <= set(art.curves):
        for b in curve_budgets:
            calibrated[b] = tuple(1.0 if i < 0 else p_for_recall(art.curves["p_grid"], art.curves["recall"][j], b)
                                  for j, i in enumerate(layer_map))
    methods = [Method("dense", "dense", in_table=True)]
    for b, top_p in sorted(calibrated.items()):
        row = b == own_budget
        cal = f"specattn-cal-r{b:g}"
        methods += [
            Method(cal, "specattn", top_p, group=GROUP_CALIBRATED, x=b, in_table=row),
            Method(f"streaming-cal-r{b:g}", "streaming", match=cal, group="StreamingLLM", x=b, in_table=row),
            Method(f"quest-cal-r{b:g}", "quest", match=cal, group="Quest", x=b, in_table=row),
        ]
        if row:  # the upper bounds once, at the artifact's own budget (each pass costs ~13 s per text on 2 cores)
            head = f"oracle-head-cal-r{b:g}"
            methods += [Method(f"oracle-cal-r{b:g}", "oracle", top_p, group="Oracle top-p (calibrated p)", x=b,
                               in_table=True),
                        # selection granularity: one chunk set per KV head, from perfect knowledge, and Quest
                        # (also per head) at its KV
                        Method(head, "oracle_head", top_p, group="Oracle top-p per KV head", x=b, in_table=True),
                        Method(f"quest-head-cal-r{b:g}", "quest", match=head, group="Quest at per-head oracle KV",
                               x=b, in_table=True)]
    if art.per_head:  # the per-head curve only in full runs (three passes per p and text)
        curve = () if quick else tuple(set(HEAD_CURVE_P) | set(global_p))
        methods += per_head_methods(art, own_budget, global_p, curve)
    methods += sparse_draft_methods(art, own_budget)
    sweep = sorted(set(global_p) | (set() if quick else {0.9}))
    methods += [Method(f"specattn-p{p:g}", "specattn", dense_p(p), group=GROUP_GLOBAL, x=p, in_table=p in global_p)
                for p in (global_p if quick else sweep)]
    return methods


def per_head_methods(art: Artifact, own_budget: float, global_p: tuple[float, ...],
                     curve_p: tuple[float, ...] = ()) -> list[Method]:
    """Per-KV-head SpecAttn at the artifact's per-head p, and at one p for every sparse head for each of
    ``curve_p`` (its curve; the ``global_p`` among them are table rows), each followed by Quest and StreamingLLM
    at its chunk counts (per query, averaged over heads: the same KV)."""
    head_map = tuple(map(tuple, art.head_map.tolist()))
    dense = art.layer_map == -1
    points = [(f"r{own_budget:g}", GROUP_HEAD_CALIBRATED, own_budget, art.top_p_head, True)]
    for p in sorted(curve_p):
        points.append((f"p{p:g}", GROUP_HEAD_GLOBAL, p,
                       torch.where(dense[:, None], 1.0, float(p)).expand_as(art.top_p_head), p in global_p))
    methods = []
    for tag, group, x, top_p_head, row in points:
        name = f"specattn-head-{'cal-' if group == GROUP_HEAD_CALIBRATED else ''}{tag}"
        methods += [
            Method(name, "specattn_head", head_map=head_map, top_p_head=tuple(map(tuple, top_p_head.tolist())),
                   group=group, x=x, in_table=row),
            Method(f"quest-head-spec-{tag}", "quest", match=name, group="Quest at per-head SpecAttn KV", x=x,
                   in_table=row),
            Method(f"streaming-head-spec-{tag}", "streaming", match=name,
                   group="StreamingLLM at per-head SpecAttn KV", x=x, in_table=row),
        ]
    return methods


def draft_k_of(art: Artifact) -> int:
    """Drafts per step the artifact's ``draft_top_p`` were tuned for (4 where the objective does not say)."""
    return int((art.info("objective").get("sparse_draft") or {}).get("k", 4))


def sparse_draft_methods(art: Artifact, own_budget: float) -> list[Method]:
    """Calibrated SpecAttn with the selections the sparse draft records (per layer, and per KV head with a head
    map), when some draft layer of the artifact reads sparsely; none otherwise."""
    if not art.sparse_draft:
        return []
    dp, k = tuple(art.draft_top_p.tolist()), draft_k_of(art)
    methods = [Method(f"specattn-cal-r{own_budget:g}-sparse-draft", "specattn", tuple(art.top_p.tolist()),
                      group=GROUP_SPARSE_DRAFT, x=own_budget, in_table=True, draft_top_p=dp, draft_k=k)]
    if art.per_head:
        methods.append(Method(f"specattn-head-cal-r{own_budget:g}-sparse-draft", "specattn_head",
                              head_map=tuple(map(tuple, art.head_map.tolist())),
                              top_p_head=tuple(map(tuple, art.top_p_head.tolist())), group=GROUP_HEAD_SPARSE_DRAFT,
                              x=own_budget, in_table=True, draft_top_p=dp, draft_k=k))
    return methods


@functools.lru_cache(maxsize=1)
def evaluation_models(draft_dir: str, target_dir: str, dtype: str = "float32"):
    """``(target, draft)`` under the evaluation and recording attentions, the target in ``dtype``, loaded once per
    process (a Dask worker evaluating several shards loads them once); ``evaluation_models.cache_clear()`` frees
    them. The draft stays float32: one pass per text, and its attention decides every selection."""
    target = load_causal_lm(target_dir, role="target", dtype=DTYPES[dtype], attn_implementation=sparse_eval.register())
    draft = load_causal_lm(draft_dir, role="draft", attn_implementation=capture.register())
    for m in (target, draft):
        check_supported(m.config, variants=True)
    return target, draft


def window_results(draft_dir: str, target_dir: str, windows: torch.Tensor, layer_map: list[int],
                   methods: list[Method], chunk_size: int, prefill_fraction: float, progress: bool = True,
                   dtype: str = "float32") -> list:
    """Every method on every window (one teacher-forced pass each): per window, ``{method: WindowResult}``."""
    prefill = math.ceil(prefill_fraction * windows.shape[1])
    target, draft = evaluation_models(draft_dir, target_dir, dtype)
    results = []
    with tqdm(total=windows.shape[0] * len(methods), desc="evaluate", unit="pass", disable=not progress) as bar:
        for w in windows:
            results.append(sparse_eval.evaluate_window(target, draft, w, layer_map, methods, chunk_size, prefill,
                                                       on_method=lambda name: bar.update(1)))
    return results


def run_methods(draft_dir: str, target_dir: str, windows: torch.Tensor, layer_map: list[int],
                methods: list[Method], chunk_size: int, prefill_fraction: float, progress: bool = True,
                dtype: str = "float32") -> dict:
    """Every method on every window in this process; the aggregated per-method summary."""
    results = window_results(draft_dir, target_dir, windows, layer_map, methods, chunk_size, prefill_fraction,
                             progress, dtype)
    evaluation_models.cache_clear()
    return sparse_eval.summarize(results, methods, layer_map)


# The result carries its data (per-window NLL and counts), not a path: deleting the output folder cannot break it,
# and a lost or cut record in Prefect's result storage reads as a miss. The shared policy still applies, so a
# result that ever names a file is checked like the calibration shards.
@task(**CACHED, retries=2, retry_delay_seconds=2, task_run_name="evaluate-texts-{start}:{stop}")
def evaluate_texts(draft_dir: str, target_dir: str, token_ids: list[list[int]], start: int, stop: int,
                   layer_map: list[int], methods: list[Method], chunk_size: int, prefill_fraction: float,
                   dtype: str = "float32") -> list:
    """One shard of the evaluation: texts ``[start, stop)`` (their ``token_ids``), every method (task-cached on
    its inputs). The ids come as lists, not a tensor: Prefect hashes a tensor by its storage's identity, so a
    tensor input would give every run a new key and the cache would never hit."""
    return window_results(draft_dir, target_dir, torch.tensor(token_ids), layer_map, methods, chunk_size,
                          prefill_fraction, progress=False, dtype=dtype)


@flow(name="evaluate-texts", log_prints=True)
def evaluate_sharded(draft_dir: str, target_dir: str, windows: torch.Tensor, layer_map: list[int],
                     methods: list[Method], chunk_size: int, prefill_fraction: float, texts_per_shard: int = 1,
                     dask_resources: dict | None = None, dtype: str = "float32") -> list:
    """:func:`window_results` over shards of texts, on the subflow's task runner (:mod:`pipelines.collect`)."""
    with annotate(dask_resources):
        futures = [evaluate_texts.submit(draft_dir, target_dir, windows[s:e].tolist(), s, e, layer_map, methods,
                                         chunk_size, prefill_fraction, dtype)
                   for s, e in shard_ranges(len(windows), texts_per_shard)]
    wait_with_progress(futures, "evaluation shards")
    evaluation_models.cache_clear()  # this process may have run shards: free the models it kept
    return [r for f in futures for r in f.result()]


@task
def holdout_perplexity(draft_dir: str, target_dir: str, windows_path: str, layer_map: list[int],
                       top_p: list[float], chunk_size: int, prefill_fraction: float = 0.1,
                       head_map: list[list[int]] | None = None, top_p_head: list[list[float]] | None = None,
                       draft_top_p: list[float] | None = None, draft_k: int = 4) -> dict:
    """Dense vs calibrated SpecAttn perplexity on the calibration holdout (what ``calibrate`` records); with a
    head map, per-head selection too (keys ending in ``_head``); with ``draft_top_p`` (some p < 1), the same with
    the selections the sparse draft records (keys with ``sparse_draft``)."""
    from safetensors.torch import load_file

    windows = load_file(windows_path)["holdout"]
    methods = [Method("dense", "dense"), Method("specattn", "specattn", tuple(top_p))]
    if head_map is not None:
        methods.append(Method("specattn_head", "specattn_head", head_map=tuple(map(tuple, head_map)),
                              top_p_head=tuple(map(tuple, top_p_head))))
    sd = tuple(draft_top_p) if draft_top_p is not None and min(draft_top_p) < 1.0 else ()
    if sd:
        methods += [dataclasses.replace(m, name=f"{m.name}_sparse_draft", draft_top_p=sd, draft_k=draft_k)
                    for m in methods if m.kind != "dense"]
    rows = run_methods(draft_dir, target_dir, windows, layer_map, methods, chunk_size, prefill_fraction,
                       progress=False)
    out = {"perplexity_dense": rows["dense"]["perplexity"], "perplexity_sparse": rows["specattn"]["perplexity"],
           "perplexity_increase": rows["specattn"]["perplexity_increase"],
           "ppl_kv_reduction_all_layers": rows["specattn"]["kv_reduction_all_layers"]}
    if head_map is not None:
        out |= {"perplexity_sparse_head": rows["specattn_head"]["perplexity"],
                "perplexity_increase_head": rows["specattn_head"]["perplexity_increase"],
                "ppl_kv_reduction_all_layers_head": rows["specattn_head"]["kv_reduction_all_layers"]}
    for name, tag in (("specattn_sparse_draft", ""), ("specattn_head_sparse_draft", "_head")):
        if name in rows:
            out |= {f"perplexity_sparse{tag}_sparse_draft": rows[name]["perplexity"],
                    f"perplexity_increase{tag}_sparse_draft": rows[name]["perplexity_increase"],
                    f"ppl_kv_reduction_all_layers{tag}_sparse_draft": rows[name]["kv_reduction_all_layers"]}
    return out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def check_params(artifact: str = "artifacts/quick/latest.safetensors", preset: str | None = "quick",
                 draft: str | None = None, target: str | None = None, text: str | None = None,
                 text_tokens: int = 2048, num_texts: int = 4, prefill_fraction: float = 0.1,
                 global_p: tuple[float, ...] = DEFAULT_GLOBAL_P, curve_budgets: tuple[float, ...] = DEFAULT_CURVE_BUDGETS,
                 dtype: str = "float32", **_) -> None:
    """The flow's parameters, checked without a Prefect server or a model (the artifact file is read: it is
    small); the flow calls it first, ``python -m pipelines.evaluate`` before it starts the flow."""
    if not 0.0 < prefill_fraction < 1.0:  # the first position has no context to be sparse over: always dense
        raise ValueError(f"prefill_fraction must lie in (0, 1), got {prefill_fraction}")
    if num_texts < 1:
        raise ValueError(f"num_texts must be >= 1, got {num_texts}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for name, values in (("global p", global_p), ("curve budget", curve_budgets)):
        bad = [v for v in values if not 0.0 < v <= 1.0]
        if bad:
            raise ValueError(f"{name} values must lie in (0, 1], got {bad}")
    if text is not None and not Path(text).expanduser().exists():
        raise FileNotFoundError(f"text {text} does not exist (a .txt book or a directory of them)")
    check_pair(preset, draft, target)
    art = load_artifact(Path(artifact).expanduser())
    if art.metadata["mode"] != "draft":
        raise ValueError(f"{artifact} is a mode {art.metadata['mode']!r} artifact: this flow evaluates draft-guided "
                         "sparse verification (perplexity); self-speculation is lossless and is measured by "
                         "acceptance: python bench/self_spec_quality.py")
    if text_tokens < 2 * art.chunk_size or math.ceil(prefill_fraction * text_tokens) >= text_tokens - 1:
        raise ValueError(f"text_tokens={text_tokens} is too short: it must hold two chunks of {art.chunk_size} "
                         "and leave decode steps after the prefill")


@flow(name="evaluate", log_prints=True)
def evaluate(
    artifact: str = "artifacts/quick/latest.safetensors",
    preset: str | None = "quick",
    draft: str | None = None,
    target: str | None = None,
    text: str | None = None,
    text_tokens: int = 2048,
    num_texts: int = 4,
    prefill_fraction: float = 0.1,
    global_p: tuple[float, ...] = DEFAULT_GLOBAL_P,
    curve_budgets: tuple[float, ...] = DEFAULT_CURVE_BUDGETS,
    quick: bool = False,
    output_dir: str | None = None,
    allow_mismatch: bool = False,
    dask_address: str | None = None,
    workers: int = 0,
    texts_per_shard: int = 1,
    dask_resources: dict[str, float] | None = None,
    dtype: str = "float32",
) -> str:
    """Evaluate an artifact on long text; return the path of the evaluation JSON.

    Parameters
    ----------
    artifact : str
        Calibration artifact (``.safetensors``).
    preset, draft, target : str, optional
        The model pair the artifact was calibrated on (a shipped preset, or both local directories).
    text : str, optional
        ``.txt`` book(s); default: Jane Austen's six novels (Debian ``r-cran-janeaustenr``).
    text_tokens, num_texts : int
        Texts are ``num_texts`` windows of ``text_tokens`` tokens (the paper: 2048), books taken in turn.
    prefill_fraction : float
        Leading share of each text attended densely (the paper: 0.1); the rest is scored as decode steps.
    global_p : tuple of float
        Global-p SpecAttn rows (the paper's 0.95 / 0.97 / 0.99).
    curve_budgets : tuple of float
        Further recall budgets for the trade-off curves (per-layer p read off the artifact's recall curves).
    quick : bool
        Table rows only, no curves (tests, smoke runs).
    output_dir : str, optional
        Default ``<artifact folder>/evaluation/<artifact name>/``.
    allow_mismatch : bool
        Accept models whose hashes differ from the artifact's (layer counts must still match).
    dask_address, workers, texts_per_shard, dask_resources
        Where the passes run, as in the ``calibrate`` flow (:mod:`pipelines.collect`): shards of
        ``texts_per_shard`` texts on an existing Dask cluster, a local one of ``workers`` processes, or here.
    dtype : str
        ``float32`` (default) or ``bfloat16`` for both models: ~2.7x faster on a CPU with AMX (measured on
        qwen-coder, bench/RESULTS.md, with its effect on the perplexity increases).
    """
    log = get_run_logger()
    t_start = time.perf_counter()
    check_params(artifact, preset, draft, target, text, text_tokens, num_texts, prefill_fraction, global_p,
                 curve_budgets, dtype)
    check_cluster_params(dask_address, workers, texts_per_shard, dask_resources)
    art_path = Path(artifact).expanduser()
    art = load_artifact(art_path)
    draft_dir, target_dir, _ = resolve_pair(preset, draft, target)
    draft_dir, target_dir = str(check_model_dir(draft_dir, "draft")), str(check_model_dir(target_dir, "target"))
    check_against_models(art, Path(draft_dir), Path(target_dir), num_layers(draft_dir), num_layers(target_dir),
                         allow_mismatch)
    max_pos = json.loads((Path(target_dir) / "config.json").read_text()).get("max_position_embeddings")
    if max_pos and text_tokens > max_pos:
        raise ValueError(f"text_tokens={text_tokens} exceeds the target's context of {max_pos} tokens")
    out = Path(output_dir).expanduser() if output_dir else art_path.resolve().parent / "evaluation" / art_path.resolve().stem

    corpus_name, books = load_books(text)
    # Each text starts as the model's inputs do (the tokenizer's BOS where it adds one), as in calibration.
    windows, labels, prefix = evaluation_windows(books, load_tokenizer(target_dir, "target"), text_tokens, num_texts)
    methods = build_methods(art, tuple(global_p), tuple(curve_budgets), quick)
    log.info("%d texts x %d tokens, %d methods (%d passes)", len(labels), text_tokens, len(methods),
             len(labels) * len(methods))
    passes = evaluate_sharded.with_options(task_runner=task_runner(dask_address, workers))
    results = passes(draft_dir, target_dir, windows, art.layer_map.tolist(), methods, art.chunk_size,
                     prefill_fraction, texts_per_shard, dask_resources, dtype)
    rows = sparse_eval.summarize(results, methods, art.layer_map.tolist())
    seconds = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "artifact": str(art_path.resolve()), "draft": draft_dir, "target": target_dir,
        "text": {"corpus": corpus_name, "windows": labels, "tokens": text_tokens, "window_prefix": prefix,
                 "sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()},
        "protocol": {"prefill_fraction": prefill_fraction, "chunk_size": art.chunk_size, "dtype": dtype,
                     "dense_layers": art.dense_layers, "quick": quick,
                     "kv_reduction": "1 - keys read / keys visible, summed over scored queries"},
        "layer_map": art.layer_map.tolist(), "top_p": art.top_p.tolist(),
        "draft_top_p": art.draft_top_p.tolist() if art.draft_top_p is not None else None,
        "methods": rows, "table": quality_report.table_rows(rows),
        "seconds": seconds, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    json_path = out / "evaluation.json"
    _write_text(json_path, json.dumps(result, indent=1))
    md = quality_report.markdown_table(rows)
    _write_text(out / "table.md", md + "\n")
    quality_report.plot_tradeoff(rows, out / "tradeoff.png", title=f"{art_path.name}: {corpus_name}, "
                                 f"{len(labels)} x {text_tokens} tokens")
    create_table_artifact(result["table"], key="specattn-quality", description=f"Quality of {art_path.name}")
    create_markdown_artifact(f"# SpecAttn quality: {art_path.name}\n\n{md}\n\n{len(labels)} texts x {text_tokens} "
                             f"tokens of {corpus_name}; {seconds:.0f} s", key="specattn-quality-table")
    print(md)
    log.info("evaluation written to %s (%.0f s)", out, seconds)
    return str(json_path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description="Run the evaluate flow once.")
    ap.add_argument("--artifact", default=os.path.join(os.environ.get("SPECATTN_ARTIFACTS", "artifacts"),
                                                       "quick", "latest.safetensors"))
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--draft")
    ap.add_argument("--target")
    ap.add_argument("--text", help=".txt book(s); default: Jane Austen's novels")
    ap.add_argument("--text-tokens", type=int)
    ap.add_argument("--num-texts", type=int)
    ap.add_argument("--prefill-fraction", type=float,
                    help="dense share of each text (default 0.1); the rest is scored, e.g. 0.67 with "
                         "--text-tokens 6144 scores the last 2,048 positions against a 4K+ context")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default float32)")
    ap.add_argument("--global-p", type=float, nargs="+")
    ap.add_argument("--curve-budgets", type=float, nargs="+")
    ap.add_argument("--quick", action="store_true", help="table rows only, one short text unless told otherwise")
    ap.add_argument("--output-dir")
    ap.add_argument("--dask-address", help="run the passes on this Dask scheduler, e.g. tcp://host:8786")
    ap.add_argument("--workers", type=int, help="start a local Dask cluster of this many worker processes")
    ap.add_argument("--texts-per-shard", type=int)
    ap.add_argument("--dask-resources", type=parse_resources, help="worker resources per model pass, e.g. GPU=1")
    args = {k: v for k, v in vars(ap.parse_args(argv)).items() if v not in (None, False)}
    if args.get("quick"):
        args.setdefault("text_tokens", 512)
        args.setdefault("num_texts", 1)
    try:
        check_params(**args)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    print(evaluate(**args))


if __name__ == "__main__":
    main()
