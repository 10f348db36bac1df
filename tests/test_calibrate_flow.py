"""The calibrate flow on the real quick pair, under a Prefect test harness, plus every bad input it must refuse."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.calibrate import calibrate
from specattn_runtime.artifact import REQUIRED_METADATA, load_artifact
from specattn_runtime.fingerprint import model_fingerprint, tokenizer_hash

TINY = dict(window_tokens=128, num_windows=2, holdout_windows=1, queries_per_window=8)
pytestmark = pytest.mark.slow


def run_state(**params):
    """Run the flow and return its final state (does not raise)."""
    return calibrate(**params, return_state=True)


def test_calibrates_quick_pair_into_a_valid_artifact(prefect_harness, quick_pair, tmp_path):
    draft, target = quick_pair
    path = Path(calibrate(preset="quick", output_dir=str(tmp_path), **TINY))
    assert path.parent == tmp_path / "quick" and path.suffix == ".safetensors"
    assert (tmp_path / "quick" / "latest.safetensors").resolve() == path.resolve()
    art = load_artifact(path)
    assert set(REQUIRED_METADATA) <= set(art.metadata)
    assert art.n_target_layers == 30 and art.n_draft_layers == 10
    assert art.layer_map[:2].tolist() == [-1, -1] and (art.layer_map[2:] >= 0).all()
    assert (art.top_p[:2] == 1).all() and ((art.top_p[2:] > 0) & (art.top_p[2:] <= 1)).all()
    assert art.info("target_model")["weights_hash"] == model_fingerprint(target)["weights_hash"]
    assert art.info("draft_model")["config_hash"] == model_fingerprint(draft)["config_hash"]
    assert art.metadata["tokenizer_hash"] == tokenizer_hash(target)
    objective = art.info("objective")
    sparse = [j for j in range(30) if art.layer_map[j] >= 0]
    assert all(objective["calibration_recall"][j] >= 0.95 for j in sparse), "budget not met on calibration rows"
    quality = art.info("holdout_quality")
    assert 0.0 <= quality["kv_reduction_all_layers"] <= quality["kv_reduction_sparse_layers"] <= 1.0
    assert art.curves["recall"].shape == (30, art.curves["p_grid"].numel())
    # The early-exit draft *is* the target's first 10 layers: each of those aligns to itself at KL ~ 0.
    assert art.layer_map[2:10].tolist() == list(range(2, 10))
    assert torch.all(art.kl.diagonal()[:10] < 1e-4)
    # sparse drafting (on by default): the draft's own p, the rule and its measured quality
    assert art.draft_top_p.shape == (10,) and ((art.draft_top_p > 0) & (art.draft_top_p <= 1)).all()
    sd = objective["sparse_draft"]
    assert sd["k"] == 4 and sd["budget"] == 0.05 and sd["per_head"] and sd["region_queries"] == 8
    chosen, dense = sd["calibration_chosen"], sd["calibration_dense"]
    assert chosen["mean_accepted_length"] >= 0.95 * dense["mean_accepted_length"] - 1e-9
    assert chosen["draft_kv_read_all_layers"] <= 1.0 and dense["draft_kv_read_all_layers"] == 1.0
    n_cand = art.curves["draft_candidate_accepted_length"].numel()
    assert art.curves["draft_candidate_top_p"].shape == (n_cand, 10)
    assert art.curves["draft_recall"].shape == (10, art.curves["p_grid"].numel())
    hold = quality["sparse_draft"]
    assert 1.0 <= hold["dense"]["mean_accepted_length"] <= 5.0 and 0 < hold["sparse"]["draft_kv_read_all_layers"] <= 1
    if art.sparse_draft:  # the target's perplexity with the sparse draft's selections, beside the dense draft's
        assert quality["perplexity_sparse_sparse_draft"] > 1 and "perplexity_increase_head_sparse_draft" in quality


def test_rerun_is_served_from_cache(prefect_harness, tmp_path):
    calibrate(preset="quick", output_dir=str(tmp_path), **TINY)
    state = run_state(preset="quick", output_dir=str(tmp_path), **TINY)
    from prefect.client.orchestration import get_client

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    parent = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
        subflows = {r.id for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))}
    cached = {r.name.rsplit("-", 1)[0] for r in runs if r.flow_run_id == parent and r.state.name == "Cached"}
    assert "load_corpus" in cached
    shards = [r for r in runs if r.flow_run_id in subflows and r.name.startswith("attention-")]
    assert shards and all(r.state.name == "Cached" for r in shards)  # every attention shard: no model pass


def test_custom_pair_is_written_under_its_models_names(prefect_harness, quick_pair, tmp_path):
    draft, target = quick_pair
    path = Path(calibrate(draft=draft, target=target, output_dir=str(tmp_path), **TINY))
    assert path.parent == tmp_path / f"{Path(draft).name}__{Path(target).name}"
    assert not (tmp_path / "quick").exists()
    assert load_artifact(path).n_target_layers == 30


def test_skip_if_unchanged_reuses_latest(prefect_harness, tmp_path):
    first = calibrate(preset="quick", output_dir=str(tmp_path), **TINY)
    again = calibrate(preset="quick", output_dir=str(tmp_path), skip_if_unchanged=True, **TINY)
    assert Path(again) == Path(first).resolve()
    changed = calibrate(preset="quick", output_dir=str(tmp_path), skip_if_unchanged=True, recall_budget=0.9, **TINY)
    assert Path(changed) != Path(first) and Path(changed).exists()


def test_global_p_reproduces_paper_setting(prefect_harness, tmp_path):
    art = load_artifact(calibrate(preset="quick", output_dir=str(tmp_path), global_p=0.97, sparse_draft=False,
                                  **TINY))
    assert torch.allclose(art.top_p[2:], torch.tensor(0.97)) and art.info("objective")["kind"] == "global_p"
    # without sparse drafting: no draft_top_p, the draft reads densely
    assert art.draft_top_p is None and art.info("objective")["sparse_draft"] is None
    assert "sparse_draft" not in art.info("holdout_quality")


def _different_tokenizer_copy(src: str, dst: Path) -> Path:
    """A real model directory whose tokenizer differs from ``src`` (two vocabulary ids swapped)."""
    dst.mkdir()
    for f in Path(src).iterdir():
        (dst / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, dst / f.name)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


@pytest.mark.parametrize("case,match", [
    ("missing_model", "does not exist"),
    ("not_a_model", "no config.json"),
    ("tokenizers_differ", "different tokenizers"),
    ("empty_corpus", "empty"),
    ("short_corpus", "too short"),
    ("chunk_size", "chunk_size must be > 0"),
    ("budget", "recall_budget must lie in"),
    ("global_p", "global_p must lie in"),
    ("output_dir", "not writable"),
    ("window_too_long", "exceeds the target's context"),
    ("one_sided_pair", "both draft and target"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(prefect_harness, quick_pair, tmp_path, case, match):
    draft, target = quick_pair
    out = tmp_path / "out"
    params = dict(preset="quick", output_dir=str(out), **TINY)
    if case == "missing_model":
        params.update(draft=str(tmp_path / "nope"), target=target)
    elif case == "not_a_model":
        (tmp_path / "empty").mkdir()
        params.update(draft=draft, target=str(tmp_path / "empty"))
    elif case == "tokenizers_differ":
        params.update(draft=str(_different_tokenizer_copy(draft, tmp_path / "other")), target=target)
    elif case == "empty_corpus":
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "a.txt").write_text("  \n")
        (tmp_path / "c" / "b.txt").write_text("\n")
        params.update(corpus=str(tmp_path / "c"))
    elif case == "short_corpus":
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "a.txt").write_text("A short text.")
        (tmp_path / "c" / "b.txt").write_text("Another one.")
        params.update(corpus=str(tmp_path / "c"))
    elif case == "chunk_size":
        params.update(chunk_size=0)
    elif case == "budget":
        params.update(recall_budget=1.5)
    elif case == "global_p":
        params.update(global_p=0.0)
    elif case == "output_dir":
        (tmp_path / "file").write_text("x")
        params.update(output_dir=str(tmp_path / "file" / "sub"))
    elif case == "window_too_long":
        params.update(window_tokens=100_000)
    elif case == "one_sided_pair":
        params.update(draft=draft)
    with pytest.raises((ValueError, OSError), match=match):
        calibrate(**params)
    assert not list(out.glob("*/*.safetensors")), "nothing may be written for a refused run"


def test_user_corpus_through_datasets(prefect_harness, tmp_path):
    from pipelines import assets
    from pipelines.corpus import wiki_articles

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, (_, text) in enumerate(wiki_articles(assets.fetch(assets.ENWIKI_BZ2))[:6]):
        (corpus / f"{i}.txt").write_text(text)
    art = load_artifact(calibrate(preset="quick", corpus=str(corpus), output_dir=str(tmp_path / "o"), **TINY))
    assert art.info("calibration_corpus")["name"] == "corpus" and art.info("calibration_corpus")["documents"] == 6
