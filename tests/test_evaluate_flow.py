"""The evaluate flow on the real quick pair and the Austen text, under a Prefect test harness; its bad inputs."""

import json
from pathlib import Path

import pytest

from pipelines.evaluate import evaluate
from specattn_runtime.artifact import ArtifactError, load_artifact

pytestmark = pytest.mark.slow


def test_quick_evaluation_writes_table_json_and_plot(quick_evaluation, calibrated_quick):
    out = Path(quick_evaluation).parent
    result = json.loads(Path(quick_evaluation).read_text())
    methods = result["methods"]
    kinds = sorted(r["kind"] for r in methods.values() if not r["sparse_draft"])
    assert kinds == ["dense", "oracle", "oracle_head", "quest", "quest", "quest", "specattn", "specattn", "specattn",
                     "specattn", "specattn_head", "streaming", "streaming"]
    # an artifact that drafts sparsely: calibrated SpecAttn again, per layer and per KV head, from the rows the
    # sparse draft records, beside the dense-draft rows
    art = load_artifact(calibrated_quick)
    sd = sorted((r["kind"], r["group"]) for r in methods.values() if r["sparse_draft"])
    assert sd == ([("specattn", "SpecAttn calibrated, sparse draft"),
                   ("specattn_head", "SpecAttn per-head calibrated, sparse draft")] if art.sparse_draft else [])
    assert result["draft_top_p"] == art.draft_top_p.tolist()
    assert len(result["table"]) == 13 + len(sd) and result["text"]["windows"] == ["emma[0]", "mansfieldpark[0]"]
    assert sum("sparse draft" in r["method"] for r in result["table"]) == len(sd)
    dense = methods["dense"]
    assert dense["perplexity_increase"] == 0 and 1 < dense["perplexity"] < 1000
    for r in methods.values():
        assert r["perplexity"] > 0 and 0 <= r["kv_reduction_all_layers"] <= r["kv_reduction_sparse_layers"] < 1
        assert len(r["step_nll"]) == 256 - 26 - 1  # 10% prefill, the last token predicts nothing
    cal = [n for n, r in methods.items() if r["kind"] == "specattn" and r["group"] == "SpecAttn calibrated"][0]
    for kind in ("streaming", "quest"):  # matched budgets read the same keys
        row = next(r for r in methods.values() if r["kind"] == kind and r["match"] == cal)
        assert row["kv_reduction_all_layers"] == pytest.approx(methods[cal]["kv_reduction_all_layers"], abs=1e-3)
    head = next(n for n, r in methods.items() if r["kind"] == "oracle_head")  # per-head oracle, Quest at its KV
    quest_head = next(r for r in methods.values() if r["kind"] == "quest" and r["match"] == head)
    assert quest_head["kv_reduction_all_layers"] == pytest.approx(methods[head]["kv_reduction_all_layers"], abs=0.01)
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Dense |" in (out / "table.md").read_text()
    # the calibrate flow recorded holdout perplexity in the artifact
    quality = load_artifact(calibrated_quick).info("holdout_quality")
    assert quality["perplexity_dense"] > 1 and quality["perplexity_increase"] > -0.5


def test_bad_inputs_fail_clearly_and_write_nothing(prefect_harness, calibrated_quick, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "note.txt").write_text("Too short to hold one window.")
    cases = [
        (dict(artifact=str(tmp_path / "missing.safetensors")), FileNotFoundError, "no artifact"),
        (dict(artifact=calibrated_quick, text=str(tmp_path / "empty")), ValueError, "holds no .txt"),
        (dict(artifact=calibrated_quick, text_tokens=16), ValueError, "too short"),
        (dict(artifact=calibrated_quick, num_texts=0), ValueError, "num_texts"),
        (dict(artifact=calibrated_quick, text=str(tmp_path / "short"), text_tokens=256), ValueError, "windows of 256"),
        (dict(artifact=calibrated_quick, prefill_fraction=1.0), ValueError, "prefill_fraction"),
        (dict(artifact=calibrated_quick, global_p=(0.0,)), ValueError, "global p"),
        (dict(artifact=calibrated_quick, dtype="float16"), ValueError, "dtype"),
        (dict(artifact=calibrated_quick, text=str(tmp_path / "nope")), FileNotFoundError, "does not exist"),
        (dict(artifact=calibrated_quick, text_tokens=99999), ValueError, "context"),
    ]
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases.append((dict(artifact=str(tmp_path / "corrupt.safetensors")), ArtifactError, "corrupt.safetensors"))
    for params, exc, match in cases:
        with pytest.raises(exc, match=match):
            evaluate(**params, quick=True, output_dir=str(out))
    from pipelines.presets import PAIRS

    d, t = PAIRS["quick"].ensure()
    with pytest.raises(ValueError, match="layers"):  # draft and target swapped: not the calibrated pair
        evaluate(artifact=calibrated_quick, draft=str(t), target=str(d), quick=True, output_dir=str(out))
    assert not out.exists() or not any(out.iterdir())
