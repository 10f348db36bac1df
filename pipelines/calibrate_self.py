"""``calibrate --mode self``: one model, a text corpus in, a mode ``self`` artifact out.

load corpus -> dense passes over the calibration windows -> per-layer recall curves of the verification-guided
selection -> candidate budgets measured teacher-forced (:mod:`pipelines.self_tuning`) -> the one with most accepted
tokens per KV read -> the same on the holdout windows -> atomic artifact write + ``latest``.

The artifact maps each sparse layer to itself (the draft is the model), holds the per-layer p of the drafting's
per-KV-head selection, every candidate's measured acceptance and KV read as curves, and the target's hashes.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from safetensors.torch import load_file
from tqdm.auto import tqdm

import specattn_runtime
from specattn_runtime.artifact import (FORMAT, SCHEMA_VERSION, Artifact, load_artifact, save_artifact, update_latest,
                                       window_metadata)
from specattn_runtime.fingerprint import model_fingerprint, tokenizer_hash
from specattn_runtime.models import check_model_dir, layer_windows_of, load_causal_lm, num_layers
from specattn_runtime.variants import check_supported, layer_windows

from . import calibration_tasks as T
from . import self_tuning as S
from .candidates import MIN_SPARSE_WINDOW, short_window_layers, sparse_candidates
from .presets import PAIRS, model_folder_name

TEMPERATURES = (1.0, 0.8)


def resolve_model(preset: str | None, target: str | None) -> tuple[str, str]:
    """``(model_dir, artifact folder name)``: a local directory, or a preset's target (fetched if needed)."""
    if target:
        d = check_model_dir(target, "target")
        from transformers import AutoConfig

        check_supported(AutoConfig.from_pretrained(d), variants=True)
        return str(d), f"{model_folder_name(str(d))}-self"
    if preset not in PAIRS:
        raise ValueError(f"unknown preset {preset!r}; presets are {sorted(PAIRS)}, or pass target=")
    from .assets import convert

    (d,) = convert([PAIRS[preset].target])
    return str(d), f"{preset}-self"


def _dense_windows(model, windows: torch.Tensor, n_region: int, k: int, layers: list[int], chunk_size: int,
                   what: str) -> list[S.DenseWindow]:
    return [S.dense_pass(model, windows[i], n_region, k, layers, chunk_size)
            for i in tqdm(range(windows.shape[0]), desc=f"dense passes ({what})", unit="window")]


@task
def tune_and_check(model_dir: str, windows_path: str, draft_k: int, queries_per_window: int, chunk_size: int,
                   dense_layers: int, global_p: float | None, min_sparse_window: int = MIN_SPARSE_WINDOW) -> dict:
    """Dense passes, the teacher-forced search, and the chosen budgets measured on the holdout windows. The first
    ``dense_layers`` and the layers with a window shorter than ``min_sparse_window`` draft densely."""
    model = load_causal_lm(model_dir, attn_implementation=S.register())
    n_layers = model.config.num_hidden_layers
    windows = layer_windows(model.config)
    layers = sparse_candidates(windows, dense_layers, min_sparse_window)
    if not layers:
        raise ValueError(f"no layer of the model can draft sparsely: the first {dense_layers} are dense and the "
                         f"others have sliding windows shorter than min_sparse_window={min_sparse_window}")
    win = load_file(windows_path)
    n_region = S.region_size(win["calibration"].shape[1], queries_per_window, draft_k)
    cal = _dense_windows(model, win["calibration"], n_region, draft_k, layers, chunk_size, "calibration")
    tuned = S.tune_self(model, cal, layers, n_layers, T.P_GRID, global_p, TEMPERATURES)
    del cal  # every layer's K/V of every window: free them before the holdout's
    hold = _dense_windows(model, win["holdout"], n_region, draft_k, layers, chunk_size, "holdout")
    ps = tuned["top_p"]
    total = S.measure(model, hold, layers, lambda w: (S.chunks_for(w, layers, ps), None), TEMPERATURES)
    return {"layers": layers, "n_layers": n_layers, "top_p": [ps.get(j, 1.0) for j in range(n_layers)],
            "candidates": tuned["candidates"], "best": tuned["best"], "recall": tuned["recall"].tolist(),
            "read": tuned["read"].tolist(), "holdout": S.summarize(total, draft_k, n_layers, layers),
            "n_region": n_region, "window_dense_layers": short_window_layers(windows, min_sparse_window),
            "min_sparse_window": min_sparse_window}


def calibrate_self(preset: str | None, target: str | None, corpus: str | None, window_tokens: int,
                   num_windows: int, holdout_windows: int, queries_per_window: int, chunk_size: int,
                   dense_layers: int, global_p: float | None, draft_k: int, out_root: Path,
                   skip_if_unchanged: bool, min_sparse_window: int = MIN_SPARSE_WINDOW) -> str:
    """The body of the ``calibrate`` flow for ``mode="self"`` (parameters already checked)."""
    log = get_run_logger()
    t0 = time.perf_counter()
    model_dir, name = resolve_model(preset, target)
    fp = model_fingerprint(model_dir)
    tok_hash = tokenizer_hash(model_dir)
    n_t = num_layers(model_dir)
    if dense_layers >= n_t:
        raise ValueError(f"dense_layers={dense_layers} leaves none of the model's {n_t} layers sparse")
    max_pos = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    if max_pos and window_tokens > max_pos:
        raise ValueError(f"window_tokens={window_tokens} exceeds the model's context of {max_pos} tokens")
    S.region_size(window_tokens, queries_per_window, draft_k)
    work_dir = str(out_root / ".work")
    corpus_info = T.load_corpus(corpus, model_dir, tok_hash, window_tokens, num_windows, holdout_windows, work_dir)
    params = dict(mode="self", window_tokens=window_tokens, num_windows=num_windows,
                  holdout_windows=holdout_windows, queries_per_window=queries_per_window, chunk_size=chunk_size,
                  dense_layers=dense_layers, global_p=global_p, draft_k=draft_k)
    # BOS-started windows differ from earlier calibrations' (recalibrate); without a prefix the windows are as
    # they were, and so is the fingerprint of an artifact already calibrated on them.
    if corpus_info["window_prefix"]:
        params["window_prefix"] = corpus_info["window_prefix"]
    if short_window_layers(layer_windows_of(model_dir), min_sparse_window):  # else: fingerprint as before
        params["min_sparse_window"] = min_sparse_window
    fingerprint = hashlib.sha256(json.dumps([fp["weights_hash"], fp["config_hash"], corpus_info["sha256"], params,
                                             SCHEMA_VERSION], sort_keys=True).encode()).hexdigest()
    folder = out_root / name
    latest = folder / "latest.safetensors"
    from .calibrate import _latest_fingerprint  # the flow module imports this one lazily: no cycle

    if skip_if_unchanged and _latest_fingerprint(folder) == fingerprint:
        log.info("model, corpus and parameters unchanged since %s: nothing to do", latest)
        return str(latest.resolve())
    res = tune_and_check(model_dir, corpus_info["path"], draft_k, queries_per_window, chunk_size, dense_layers,
                         global_p, min_sparse_window)
    art = _artifact(res, fp, n_t, tok_hash, corpus_info, params, fingerprint, draft_k)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = save_artifact(art, folder / f"{stamp}-{fingerprint[:10]}.safetensors")
    load_artifact(path)  # read back through the runtime's validation before anyone points at it
    update_latest(path)
    _publish(name, path, res, time.perf_counter() - t0)
    return str(path)


def _artifact(res: dict, fp: dict, n_t: int, tok_hash: str, corpus_info: dict, params: dict, fingerprint: str,
              k: int) -> Artifact:
    layers, cands = res["layers"], res["candidates"]
    layer_map = [j if j in layers and res["top_p"][j] < 1.0 else -1 for j in range(n_t)]
    model_info = json.dumps({**fp, "n_layers": n_t})
    best = cands[res["best"]]
    full = lambda rows: torch.tensor([rows[layers.index(j)] if j in layers else [1.0] * len(T.P_GRID)  # noqa: E731
                                      for j in range(n_t)], dtype=torch.float32)
    return Artifact(
        layer_map=torch.tensor(layer_map, dtype=torch.int32),
        top_p=torch.tensor([p if m >= 0 else 1.0 for p, m in zip(res["top_p"], layer_map)], dtype=torch.float32),
        kl=torch.zeros(n_t, n_t),  # no alignment in mode self: each layer guides itself
        metadata={
            "format": FORMAT, "schema_version": str(SCHEMA_VERSION), "mode": "self",
            "chunk_size": str(params["chunk_size"]), "dense_layers": str(params["dense_layers"]),
            "draft_model": model_info, "target_model": model_info, "tokenizer_hash": tok_hash,
            "calibration_corpus": json.dumps({k_: corpus_info[k_] for k_ in
                                              ("name", "sha256", "tokens", "documents", "windows",
                                               "holdout_windows", "window_tokens")}),
            "objective": json.dumps({"kind": "accepted_tokens_per_kv_read", "k": k,
                                     "queries_per_window": params["queries_per_window"],
                                     "region_queries": res["n_region"], "global_p": params["global_p"],
                                     "min_sparse_window": res["min_sparse_window"],
                                     "window_dense_layers": res["window_dense_layers"],
                                     "chosen": {key: v for key, v in best.items()
                                                if key != "draft_kv_read_per_layer"}}),
            "holdout_quality": json.dumps(res["holdout"]),
            "input_fingerprint": fingerprint,
            **window_metadata(corpus_info["window_prefix"]),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "specattn_version": specattn_runtime.__version__,
        },
        curves={
            "p_grid": T.P_GRID.float(), "recall": full(res["recall"]), "kv_fraction": full(res["read"]),
            "accepted_length": torch.tensor([c["mean_accepted_length"] for c in cands], dtype=torch.float32),
            "accepted_length_t1": torch.tensor([c["mean_accepted_length_t1.0"] for c in cands], dtype=torch.float32),
            "draft_kv_read": torch.tensor([c["draft_kv_read_all_layers"] for c in cands], dtype=torch.float32),
            "acceptance_by_offset": torch.tensor([c["acceptance_by_offset"] for c in cands], dtype=torch.float32),
        },
    )


def _publish(name: str, path: Path, res: dict, seconds: float) -> None:
    cands, h = res["candidates"], res["holdout"]
    table = [{"recall_target": c["recall_target"], "mean_accepted_length": round(c["mean_accepted_length"], 3),
              "accepted_length_t1": round(c["mean_accepted_length_t1.0"], 3),
              "draft_kv_read": round(c["draft_kv_read_all_layers"], 4),
              "tokens_per_kv_read": round(c["tokens_per_kv_read"], 3), "chosen": i == res["best"]}
             for i, c in enumerate(cands)]
    create_table_artifact(table, key="specattn-self-candidates", description=f"Self-speculation budgets, {name}")
    md = [f"# SpecAttn self-speculation calibration: {name}", "", f"Artifact: `{path}`", "",
          f"- holdout (teacher-forced, k = {h['k']}): mean accepted length {h['mean_accepted_length']:.3f} greedy, "
          f"{h['mean_accepted_length_t1.0']:.3f} at temperature 1; draft reads {h['draft_kv_read_all_layers']:.1%} "
          f"of the KV (all layers), {h['draft_kv_read_sparse_layers']:.1%} in sparse layers",
          f"- {len(cands)} candidate budgets measured in {seconds:.0f} s", "",
          "| recall target | accepted length | draft KV read | tokens / KV read |", "|---|---|---|---|",
          *[f"| {r['recall_target']} | {r['mean_accepted_length']} | {r['draft_kv_read']} | "
            f"{r['tokens_per_kv_read']}{' (chosen)' if r['chosen'] else ''} |" for r in table]]
    create_markdown_artifact("\n".join(md), key="specattn-calibration", description=f"Calibration of {name}")
    print("\n".join(md))


def uniform_artifact(n_layers: int, top_p: float, dense_layers: int = 2, model_dir: str | None = None) -> Artifact:
    """An uncalibrated mode ``self`` artifact: one ``top_p`` on every layer after the first ``dense_layers``
    (sweeps, benchmarks and tests; ``model_dir`` fills in the model's hashes so that ``from_artifact`` accepts it)."""
    info = json.dumps({**(model_fingerprint(model_dir) if model_dir else {"name": "unspecified"}),
                       "n_layers": n_layers})
    sparse = top_p < 1.0
    layer_map = [j if j >= dense_layers and sparse else -1 for j in range(n_layers)]
    return Artifact(
        layer_map=torch.tensor(layer_map, dtype=torch.int32),
        top_p=torch.tensor([top_p if m >= 0 else 1.0 for m in layer_map], dtype=torch.float32),
        kl=torch.zeros(n_layers, n_layers),
        metadata={"format": FORMAT, "schema_version": str(SCHEMA_VERSION), "mode": "self", "chunk_size": "16",
                  "dense_layers": str(dense_layers), "draft_model": info, "target_model": info,
                  "tokenizer_hash": tokenizer_hash(model_dir) if model_dir else "",
                  "calibration_corpus": json.dumps({"name": "none (uniform p)"}),
                  "objective": json.dumps({"kind": "uniform_p", "top_p": top_p}), "holdout_quality": "{}",
                  "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "specattn_version": specattn_runtime.__version__})
