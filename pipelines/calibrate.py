"""The ``calibrate`` flow: a draft/target pair and a text corpus in, a validated SpecAttn artifact out.

load corpus -> collect attention (draft, target; calibration and holdout) -> KL matrix -> monotone alignment ->
per-layer top-p -> the draft's own p for sparse drafting (acceptance measured teacher-forced) -> holdout check
(recall, KV read, sparse perplexity) -> atomic artifact write + ``latest`` -> Prefect markdown/table artifacts.

Run it once: ``python -m pipelines.calibrate --preset quick`` (or any flow parameter as ``--name value``).
As a deployment: see :mod:`pipelines.deployments` and the README.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

import specattn_runtime
from specattn_runtime.artifact import (FORMAT, SCHEMA_VERSION, Artifact, load_artifact, save_artifact, update_latest,
                                       window_metadata)

from . import calibration_tasks as T
from .candidates import MIN_SPARSE_WINDOW, short_window_layers
from .collect import (ROLES, SPLITS, check_cluster_params, collect_attention, parse_resources,
                      task_runner)
from .evaluate import holdout_perplexity
from .presets import check_pair, resolve_pair

MODES = ("draft", "self")


def check_params(preset: str | None = "quick", draft: str | None = None, target: str | None = None,
                 corpus: str | None = None, chunk_size: int = 16, recall_budget: float = 0.95,
                 global_p: float | None = None, window_tokens: int = 1024, num_windows: int = 16,
                 holdout_windows: int = 4, queries_per_window: int = 64, dense_layers: int = 2,
                 dask_address: str | None = None, workers: int = 0, windows_per_shard: int = 8,
                 dask_resources: dict | None = None, mode: str = "draft", draft_k: int = 4,
                 sparse_draft: bool = True, draft_acceptance_budget: float = 0.05, draft_dense_layers: int = 0,
                 min_sparse_window: int = MIN_SPARSE_WINDOW, **_) -> None:
    """The flow's parameters, checked without a Prefect server or a model: the flow calls it first, and
    ``python -m pipelines.calibrate`` calls it before it starts the flow (a typo costs no server start-up)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "self":
        if draft:
            raise ValueError("mode 'self' calibrates one model that drafts for itself: pass target= (or a preset), "
                             "not draft=")
        if target:
            check_pair(None, target, target)
        else:
            check_pair(preset, None, None)
        if dask_address or workers:
            raise ValueError("mode 'self' runs in this process: dask_address and workers are for mode 'draft'")
        if draft_k < 1:
            raise ValueError(f"draft_k (tokens drafted per verification) must be >= 1, got {draft_k}")
        from .self_tuning import region_size

        region_size(window_tokens, queries_per_window, draft_k)
    else:
        check_pair(preset, draft, target)
    if corpus is not None and not Path(corpus).expanduser().exists():
        raise FileNotFoundError(f"corpus {corpus} does not exist (a .txt file or a directory of them)")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if not 0.0 < recall_budget <= 1.0:
        raise ValueError(f"recall_budget must lie in (0, 1], got {recall_budget}")
    if global_p is not None and not 0.0 < global_p <= 1.0:
        raise ValueError(f"global_p must lie in (0, 1] (or be None for per-layer tuning), got {global_p}")
    if window_tokens < 2 * chunk_size:
        raise ValueError(f"window_tokens={window_tokens} must hold at least two chunks of {chunk_size}")
    for name, v in (("num_windows", num_windows), ("holdout_windows", holdout_windows),
                    ("queries_per_window", queries_per_window)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if dense_layers < 0:
        raise ValueError(f"dense_layers must be >= 0, got {dense_layers}")
    if not isinstance(min_sparse_window, int) or min_sparse_window < 0:
        raise ValueError(f"min_sparse_window must be a whole number of tokens >= 0 (0: every window layer is a "
                         f"sparse candidate), got {min_sparse_window!r}")
    check_cluster_params(dask_address, workers, windows_per_shard, dask_resources)
    if mode == "draft" and sparse_draft:
        if not 0.0 <= draft_acceptance_budget < 1.0:
            raise ValueError("draft_acceptance_budget (the share of the dense draft's accepted length sparse "
                             f"drafting may lose) must lie in [0, 1), got {draft_acceptance_budget}; "
                             "sparse_draft=False drafts densely")
        if draft_dense_layers < 0:
            raise ValueError(f"draft_dense_layers must be >= 0, got {draft_dense_layers}")
        if draft_k < 2:
            raise ValueError(f"draft_k (tokens drafted per step, which sparse drafting is tuned for) must be >= 2 "
                             f"(one dense forward, then sparse ones), got {draft_k}")
        from .self_tuning import region_size

        region_size(window_tokens, queries_per_window, draft_k)


def _writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove we can write there, before any expensive work."""
    p = Path(path).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as e:
        raise PermissionError(f"output directory {p} is not writable ({e.strerror}); pass another output_dir") from None
    return p


def _latest_fingerprint(pair_dir: Path) -> str | None:
    latest = pair_dir / "latest.safetensors"
    try:
        return load_artifact(latest).metadata.get("input_fingerprint") if latest.exists() else None
    except ValueError:
        return None  # an unreadable latest never blocks a recalibration


@flow(name="calibrate", log_prints=True)
def calibrate(
    preset: str | None = "quick",
    draft: str | None = None,
    target: str | None = None,
    corpus: str | None = None,
    window_tokens: int = 1024,
    num_windows: int = 16,
    holdout_windows: int = 4,
    queries_per_window: int = 64,
    chunk_size: int = 16,
    dense_layers: int = 2,
    recall_budget: float = 0.95,
    global_p: float | None = None,
    output_dir: str = "artifacts",
    skip_if_unchanged: bool = False,
    dask_address: str | None = None,
    workers: int = 0,
    windows_per_shard: int = 8,
    dask_resources: dict[str, float] | None = None,
    mode: str = "draft",
    draft_k: int = 4,
    sparse_draft: bool = True,
    draft_acceptance_budget: float = 0.05,
    draft_dense_layers: int = 0,
    min_sparse_window: int = MIN_SPARSE_WINDOW,
) -> str:
    """Calibrate a draft/target pair (or, ``mode="self"``, one model); return the path of the artifact written
    (or reused).

    Parameters
    ----------
    preset : str, optional
        Shipped pair (``quick``, ``qwen-coder``) used when ``draft``/``target`` are not given.
    draft, target : str, optional
        Local Hugging Face model directories (same tokenizer).
    corpus : str, optional
        ``.txt`` file or directory of them; default: the shipped Wikipedia articles.
    window_tokens, num_windows, holdout_windows, queries_per_window : int
        Calibration text: windows of ``window_tokens`` tokens; ``queries_per_window`` decode-like query rows each.
    chunk_size : int
        KV chunk (block) size in tokens.
    dense_layers : int
        Leading target layers that stay dense.
    recall_budget : float
        Per-layer objective: smallest p keeping this mean fraction of the target's attention mass.
    global_p : float, optional
        One p for every sparse layer (the paper's setting) instead of per-layer tuning.
    output_dir : str
        Artifacts go to ``<output_dir>/<pair>/<timestamp>-<hash>.safetensors``; ``latest.safetensors`` points at
        the newest.
    skip_if_unchanged : bool
        Finish early, reusing ``latest``, when models, corpus and parameters are unchanged (scheduled runs).
    dask_address, workers : str, int
        Where attention shards run (:mod:`pipelines.collect`): an existing Dask cluster (``tcp://host:8786``), a
        local cluster of ``workers`` processes started for the run, or neither: this process. The artifact is the
        same either way.
    windows_per_shard : int
        Calibration windows per attention shard (one task, one model load per worker).
    dask_resources : dict, optional
        Dask worker resources each model pass needs, e.g. ``{"GPU": 1}`` to run them on GPU workers only.
    mode : str
        ``"draft"`` (draft-guided sparse verification) or ``"self"``: the target (``target`` or the preset's)
        drafts for itself; its per-layer budgets maximise accepted tokens per KV read, measured teacher-forced
        (:mod:`pipelines.calibrate_self`; ``recall_budget`` and the Dask options do not apply). Artifacts go to
        ``<output_dir>/<preset or model>-self/``.
    draft_k : int
        Tokens drafted per verification the budgets are tuned for (mode ``self``; mode ``draft``: sparse drafting).
    sparse_draft : bool
        Mode ``draft``: also tune the draft's own per-layer p (``draft_top_p``): after each step's first, dense draft
        forward, its sparse layers read only the top-p chunks of that forward's attention
        (:mod:`pipelines.draft_tuning`). ``False`` writes no ``draft_top_p`` (the draft reads densely).
    draft_acceptance_budget : float
        Share of the dense draft's greedy accepted length (teacher-forced, against the target's tokens) sparse
        drafting may lose; the candidate reading the least draft KV within it is chosen.
    draft_dense_layers : int
        Leading draft layers that always draft densely (default none: on the quick pair a dense layer 0 kept the
        same share of the dense draft's tokens and read 6-7 points more of the KV on the sparse forwards; the
        recall targets already give it a higher p).
    min_sparse_window : int
        Sliding-window layers (target, draft, or mode ``self``'s model) with a window shorter than this many tokens
        stay dense: inside a short window selection saves little and costs recall (:mod:`pipelines.candidates`
        says why; default 2048). 0 makes every window layer a candidate.
    """
    log = get_run_logger()
    check_params(preset, draft, target, corpus, chunk_size, recall_budget, global_p, window_tokens, num_windows,
                 holdout_windows, queries_per_window, dense_layers, dask_address, workers, windows_per_shard,
                 dask_resources, mode, draft_k, sparse_draft, draft_acceptance_budget, draft_dense_layers,
                 min_sparse_window)
    out_root = _writable_dir(output_dir)
    if mode == "self":
        from .calibrate_self import calibrate_self

        return calibrate_self(preset, target, corpus, window_tokens, num_windows, holdout_windows,
                              queries_per_window, chunk_size, dense_layers, global_p, draft_k, out_root,
                              skip_if_unchanged, min_sparse_window)
    work_dir = str(out_root / ".work")
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return result

    draft_dir, target_dir, pair = timed("prepare_models", resolve_pair, preset, draft, target)
    models = timed("prepare_models", T.prepare_models, draft_dir, target_dir)
    n_t, n_d = models["target"]["n_layers"], models["draft"]["n_layers"]
    if dense_layers > n_t:
        raise ValueError(f"dense_layers={dense_layers} exceeds the target's {n_t} layers")
    if sparse_draft and draft_dense_layers > n_d:
        raise ValueError(f"draft_dense_layers={draft_dense_layers} exceeds the draft's {n_d} layers")
    max_pos = json.loads((Path(target_dir) / "config.json").read_text()).get("max_position_embeddings")
    if max_pos and window_tokens > max_pos:
        raise ValueError(f"window_tokens={window_tokens} exceeds the target's context of {max_pos} tokens")

    corpus_info = timed("load_corpus", T.load_corpus, corpus, target_dir, models["tokenizer_hash"], window_tokens,
                        num_windows, holdout_windows, work_dir)
    params = dict(window_tokens=window_tokens, num_windows=num_windows, holdout_windows=holdout_windows,
                  queries_per_window=queries_per_window, chunk_size=chunk_size, dense_layers=dense_layers,
                  recall_budget=recall_budget, global_p=global_p)
    # BOS-started windows differ from earlier calibrations' (recalibrate); without a prefix the windows are as
    # they were, and so is the fingerprint of an artifact already calibrated on them.
    if corpus_info["window_prefix"]:
        params["window_prefix"] = corpus_info["window_prefix"]
    if sparse_draft:  # without it the artifact is what it was, and so is its fingerprint
        params |= dict(sparse_draft=True, draft_k=draft_k, draft_acceptance_budget=draft_acceptance_budget,
                       draft_dense_layers=draft_dense_layers)
    # short sliding windows stay dense (pipelines/candidates.py); models without any: fingerprint as before
    window_dense = short_window_layers(models["target"]["windows"], min_sparse_window)
    if window_dense or (sparse_draft and short_window_layers(models["draft"]["windows"], min_sparse_window)):
        params["min_sparse_window"] = min_sparse_window
    fingerprint = hashlib.sha256(json.dumps(
        [models["draft"]["weights_hash"], models["target"]["weights_hash"], models["draft"]["config_hash"],
         models["target"]["config_hash"], corpus_info["sha256"], params, SCHEMA_VERSION], sort_keys=True
    ).encode()).hexdigest()
    pair_dir = out_root / pair
    if skip_if_unchanged and _latest_fingerprint(pair_dir) == fingerprint:
        log.info("models, corpus and parameters unchanged since %s: nothing to do", pair_dir / "latest.safetensors")
        return str((pair_dir / "latest.safetensors").resolve())

    collect = collect_attention.with_options(task_runner=task_runner(dask_address, workers))
    files = timed("collect_attention", collect, models, corpus_info, queries_per_window, chunk_size, work_dir,
                  windows_per_shard, dask_resources)
    rows = {(role, split): files[f"{role}/{split}"] for role in ROLES for split in SPLITS}
    kl = timed("kl_matrix", T.compute_kl, rows["target", "calibration"], rows["draft", "calibration"])
    aligned = timed("align_layers", T.align, kl, dense_layers, window_dense)
    layer_map = aligned["layer_map"]
    tuned = timed("tune_top_p", T.tune_top_p, rows["target", "calibration"], rows["draft", "calibration"],
                  layer_map, recall_budget, global_p, chunk_size)
    holdout = timed("evaluate", T.evaluate_holdout, rows["target", "holdout"], rows["draft", "holdout"], layer_map,
                    tuned["top_p"], chunk_size)
    # Per-KV-head selection: each target KV head follows the closest head of its aligned draft layer, with its
    # own p (the artifact carries both; the runtime selects per head where its backend can read that).
    heads = timed("align_heads", T.align_kv_heads, rows["target", "calibration"], rows["draft", "calibration"],
                  layer_map)
    tuned_h = timed("tune_top_p", T.tune_top_p_heads, rows["target", "calibration"], rows["draft", "calibration"],
                    layer_map, heads["head_map"], recall_budget, global_p, chunk_size)
    holdout_h = timed("evaluate", T.evaluate_holdout_heads, rows["target", "holdout"], rows["draft", "holdout"],
                      layer_map, heads["head_map"], tuned_h["top_p"], chunk_size)
    # Sparse drafting: the draft's own p, per KV head as the runtime selects with this (per-head) artifact,
    # tuned on accepted length against the target's tokens (teacher-forced).
    drafting = timed("tune_draft_top_p", T.tune_draft_top_p, models, corpus_info["file"], draft_k,
                     queries_per_window, chunk_size, draft_dense_layers, draft_acceptance_budget,
                     min_sparse_window=min_sparse_window) \
        if sparse_draft else None
    # Recall is the tuning objective; perplexity (teacher-forced sparse passes on the holdout) is the check.
    holdout |= timed("evaluate", holdout_perplexity, draft_dir, target_dir, corpus_info["path"], layer_map,
                     tuned["top_p"], chunk_size, head_map=heads["head_map"], top_p_head=tuned_h["top_p"],
                     draft_top_p=drafting["top_p"] if drafting else None, draft_k=draft_k)
    holdout["per_head"] = {k: v for k, v in holdout_h.items() if not k.endswith("per_layer")}
    if drafting:
        holdout["sparse_draft"] = drafting["holdout"]

    t0 = time.perf_counter()
    art = Artifact(
        layer_map=torch.tensor(layer_map, dtype=torch.int32),
        top_p=torch.tensor(tuned["top_p"], dtype=torch.float32),
        kl=torch.tensor(kl, dtype=torch.float32),
        head_map=torch.tensor(heads["head_map"], dtype=torch.int32),
        top_p_head=torch.tensor(tuned_h["top_p"], dtype=torch.float32),
        draft_top_p=torch.tensor(drafting["top_p"], dtype=torch.float32) if drafting else None,
        metadata={
            "format": FORMAT, "schema_version": str(SCHEMA_VERSION), "mode": "draft",
            "chunk_size": str(chunk_size), "dense_layers": str(dense_layers),
            "draft_model": json.dumps({k: models["draft"][k] for k in ("name", "config_hash", "weights_hash")}
                                      | {"n_layers": n_d}),
            "target_model": json.dumps({k: models["target"][k] for k in ("name", "config_hash", "weights_hash")}
                                       | {"n_layers": n_t}),
            "tokenizer_hash": models["tokenizer_hash"],
            "calibration_corpus": json.dumps({k: corpus_info[k] for k in
                                              ("name", "sha256", "tokens", "documents", "windows",
                                               "holdout_windows", "window_tokens")}),
            "objective": json.dumps({"kind": "global_p" if global_p is not None else "target_mass_recall",
                                     "recall_budget": recall_budget, "global_p": global_p,
                                     "queries_per_window": queries_per_window, "alignment_cost": aligned["cost"],
                                     "head_alignment_cost": heads["cost"],
                                     "min_sparse_window": min_sparse_window, "window_dense_layers": window_dense,
                                     "calibration_recall": tuned["recall"],
                                     "calibration_kv_fraction": tuned["kv_fraction"],
                                     "sparse_draft": _draft_objective(drafting)}),
            "holdout_quality": json.dumps(holdout),
            "input_fingerprint": fingerprint,
            **window_metadata(corpus_info["window_prefix"]),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "specattn_version": specattn_runtime.__version__,
        },
        curves={
            "p_grid": torch.tensor(tuned["curves"]["p_grid"]),
            "recall": torch.tensor(tuned["curves"]["recall"]),
            "kv_fraction": torch.tensor(tuned["curves"]["kv_fraction"]),
            "holdout_recall": torch.tensor(holdout["recall_per_layer"]),
            "holdout_kv_fraction": torch.tensor(holdout["kv_fraction_per_layer"]),
            "holdout_recall_head": torch.tensor(holdout_h["recall_per_layer"]),
            "holdout_kv_fraction_head": torch.tensor(holdout_h["kv_fraction_per_layer"]),
            **_draft_curves(drafting, n_d),
        },
    )
    pair_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = save_artifact(art, pair_dir / f"{stamp}-{fingerprint[:10]}.safetensors")
    load_artifact(path)  # read back through the runtime's validation before anyone points at it
    update_latest(path)
    timings["write_artifact"] = time.perf_counter() - t0

    _publish(pair, path, layer_map, tuned, holdout, timings)
    log.info("artifact written: %s (%d bytes)", path, path.stat().st_size)
    return str(path)


def _draft_objective(drafting: dict | None) -> dict | None:
    """The ``objective`` entry of sparse drafting: the rule, its budget and the chosen candidate (calibration
    split); every candidate's numbers are in the ``draft_*`` curves."""
    if drafting is None:
        return None
    cal = drafting["calibration"]
    chosen = cal["candidates"][drafting["best"]]
    brief = lambda r: {k: v for k, v in r.items() if not k.endswith("per_layer") and k != "top_p"}  # noqa: E731
    return {"kind": "accepted_length_vs_dense_draft", "budget": drafting["budget"], "k": drafting["k"],
            "per_head": drafting["per_head"], "dense_layers": drafting["dense_layers"],
            "window_dense_layers": drafting["window_dense_layers"], "region_queries": drafting["n_region"],
            "recall_target": chosen["recall_target"],
            "calibration_dense": brief(cal["dense"]), "calibration_chosen": brief(chosen)}


def _draft_curves(drafting: dict | None, n_d: int) -> dict[str, torch.Tensor]:
    """Report curves of sparse drafting: per draft layer and p of ``P_GRID``, the sparse forwards' recall of their
    own attention and the keys they read (dense layers: 1); per candidate, accepted length, KV read and p."""
    if drafting is None:
        return {}
    cands, curves = drafting["calibration"]["candidates"], drafting["curves"]

    def per_layer(rows: list) -> torch.Tensor:  # the tuned layers' rows; dense layers read everything
        out = torch.ones(n_d, len(T.P_GRID))
        if rows:
            out[curves["layers"]] = torch.tensor(rows, dtype=torch.float32)
        return out

    return {"draft_recall": per_layer(curves["recall"]), "draft_kv_fraction": per_layer(curves["read"]),
            "draft_candidate_accepted_length": torch.tensor([c["mean_accepted_length"] for c in cands]),
            "draft_candidate_kv_read": torch.tensor([c["draft_kv_read_all_layers"] for c in cands]),
            "draft_candidate_top_p": torch.tensor([c["top_p"] for c in cands], dtype=torch.float32)}


def _publish(pair: str, path: Path, layer_map: list[int], tuned: dict, holdout: dict,
             timings: dict[str, float]) -> None:
    """Prefect UI artifacts: a markdown summary and a per-layer table."""
    table = [{"target_layer": j, "draft_layer": i, "top_p": round(p, 4), "calib_recall": round(rc, 4),
              "holdout_recall": round(hr, 4), "holdout_kv_read": round(hk, 4)}
             for j, (i, p, rc, hr, hk) in enumerate(zip(layer_map, tuned["top_p"], tuned["recall"],
                                                        holdout["recall_per_layer"],
                                                        holdout["kv_fraction_per_layer"]))]
    create_table_artifact(table, key="specattn-layers", description=f"Layer map and top-p for {pair}")
    md = [f"# SpecAttn calibration: {pair}", "", f"Artifact: `{path}`", "",
          f"- holdout KV reduction: {holdout['kv_reduction_sparse_layers']:.1%} of sparse layers, "
          f"{holdout['kv_reduction_all_layers']:.1%} of all layers",
          f"- holdout recall of target attention mass: mean {holdout['mean_recall_sparse_layers']:.4f}, "
          f"min {holdout['min_recall_sparse_layers']:.4f}",
          f"- holdout perplexity: dense {holdout['perplexity_dense']:.3f}, sparse {holdout['perplexity_sparse']:.3f} "
          f"({holdout['perplexity_increase']:+.2%})",
          f"- per-KV-head selection: KV reduction {holdout['per_head']['kv_reduction_all_layers']:.1%} of all layers, "
          f"recall {holdout['per_head']['mean_recall_sparse_layers']:.4f}, perplexity "
          f"{holdout['perplexity_sparse_head']:.3f} ({holdout['perplexity_increase_head']:+.2%})",
          *_draft_lines(holdout), "",
          "| step | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in timings.items()]]
    create_markdown_artifact("\n".join(md), key="specattn-calibration", description=f"Calibration of {pair}")
    print("\n".join(md))


def _draft_lines(holdout: dict) -> list[str]:
    sd = holdout.get("sparse_draft")
    if sd is None:
        return []
    d, s = sd["dense"], sd["sparse"]
    lines = [f"- sparse drafting (holdout, teacher-forced, k = {d['k']}): accepted length "
             f"{s['mean_accepted_length']:.3f} vs {d['mean_accepted_length']:.3f} dense-drafted "
             f"({sd['accepted_length_ratio']:.1%}); the draft reads {s['draft_kv_read_all_layers']:.1%} of its KV "
             f"({s['draft_kv_read_sparse_forwards']:.1%} on its sparse forwards)"]
    if "perplexity_sparse_sparse_draft" in holdout:
        lines.append(f"- target perplexity with the sparse draft's selections: "
                     f"{holdout['perplexity_sparse_sparse_draft']:.3f} "
                     f"({holdout['perplexity_increase_sparse_draft']:+.2%})")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipelines.calibrate", description="Run the calibrate flow once.")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--mode", choices=MODES, help="draft (default): a draft/target pair; self: the target drafts "
                    "for itself")
    ap.add_argument("--draft-k", type=int, help="tokens drafted per verification the budgets are tuned for "
                    "(default 4)")
    ap.add_argument("--no-sparse-draft", dest="sparse_draft", action="store_false", default=None,
                    help="mode draft: no draft_top_p (the draft reads its whole cache)")
    ap.add_argument("--draft-acceptance-budget", type=float,
                    help="share of the dense draft's accepted length sparse drafting may lose (default 0.05)")
    ap.add_argument("--draft-dense-layers", type=int, help="leading draft layers that draft densely (default 0)")
    ap.add_argument("--min-sparse-window", type=int, help="sliding windows shorter than this many tokens stay "
                    f"dense (default {MIN_SPARSE_WINDOW}; 0: every window layer may be sparse)")
    ap.add_argument("--draft")
    ap.add_argument("--target")
    ap.add_argument("--corpus")
    for name, typ in (("window-tokens", int), ("num-windows", int), ("holdout-windows", int),
                      ("queries-per-window", int), ("chunk-size", int), ("dense-layers", int),
                      ("recall-budget", float), ("global-p", float)):
        ap.add_argument(f"--{name}", type=typ)
    ap.add_argument("--output-dir", default=os.environ.get("SPECATTN_ARTIFACTS", "artifacts"))
    ap.add_argument("--dask-address", help="run attention shards on this Dask scheduler, e.g. tcp://host:8786")
    ap.add_argument("--workers", type=int, help="start a local Dask cluster of this many worker processes")
    ap.add_argument("--windows-per-shard", type=int)
    ap.add_argument("--dask-resources", type=parse_resources, help="worker resources per model pass, e.g. GPU=1")
    args = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    try:
        check_params(**args)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    print(calibrate(**args))


if __name__ == "__main__":
    main()
