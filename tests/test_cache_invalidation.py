"""Cached tasks after their files are deleted or cut (issue 27): real Prefect, real files, the quick pair.

A cache hit is valid only while the files it names are there with the content they had; otherwise that task alone
runs again. The calibrate tests share one output folder: each leaves it whole again for the next. Evaluation
shards carry their results, so for them the file that can be lost or cut is their record in Prefect's result
storage.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.calibrate import calibrate
from pipelines.evaluate import evaluate
from pipelines.file_results import FileRef, file_ref, stale_files

pytestmark = pytest.mark.slow
# one window per shard: 2 + 1 windows per model, so 6 attention shards
TINY = dict(window_tokens=128, num_windows=2, holdout_windows=1, queries_per_window=8, windows_per_shard=1)
EVAL = dict(quick=True, text_tokens=128, num_texts=2, texts_per_shard=1)


def task_states(state) -> dict[str, set[str]]:
    """Task run name -> the state names its runs ended in, for the flow run of ``state`` and its subflows (names
    with a random suffix, e.g. ``merge_shards-1a2``, under their base name)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    parent = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        subflows = [r.id for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent, *subflows])))
    out: dict[str, set[str]] = {}
    for r in runs:
        name = r.name if r.name.startswith(("attention-", "evaluate-texts-")) else r.name.rsplit("-", 1)[0]
        out.setdefault(name, set()).add(r.state.name)
    return out


def shards(states: dict[str, set[str]], prefix: str) -> dict[str, str]:
    """Shard task run name (``<prefix><start>:<stop>``) -> its one state name."""
    return {k: "/".join(sorted(v)) for k, v in states.items() if k.startswith(prefix) and ":" in k}


def assert_same_tensors(a: str | Path, b: str | Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_file_ref_names_what_changed(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abcd")
    ref = file_ref(path)
    assert stale_files({"a": [ref]}) == [] and Path(ref) == path
    path.write_bytes(b"abce")  # same size, other bytes
    assert stale_files([ref]) == [f"{path} has different content (sha256) from what was written"]
    path.write_bytes(b"ab")
    assert "has 2 bytes, not the 4" in stale_files(ref)[0]
    path.unlink()
    assert stale_files(("x", ref)) == [f"{path} is missing"]
    assert stale_files({"path": str(path)}) == []  # a bare path is no FileRef: nothing to check
    assert isinstance(ref, FileRef)


@pytest.fixture(scope="module")
def calibrated(prefect_harness, quick_pair, tmp_path_factory):
    """``(output folder, reference copy of the first artifact)``."""
    out = tmp_path_factory.mktemp("calibrate-out")
    first = Path(calibrate(preset="quick", output_dir=str(out), **TINY))
    keep = tmp_path_factory.mktemp("reference") / first.name
    shutil.copy(first, keep)
    return out, keep


def rerun(out: Path, **kw) -> tuple[Path, dict[str, set[str]]]:
    state = calibrate(preset="quick", output_dir=str(out), return_state=True, **TINY, **kw)
    return Path(state.result()), task_states(state)


def test_calibrate_after_its_output_folder_is_deleted(calibrated):
    out, reference = calibrated
    shutil.rmtree(out)
    path, states = rerun(out)
    assert states["load_corpus"] == {"Completed"} and states["merge_shards"] == {"Completed"}
    attention = shards(states, "attention-")
    assert len(attention) == 6 and set(attention.values()) == {"Completed"}, attention
    assert (out / "quick" / "latest.safetensors").resolve() == path.resolve()
    assert_same_tensors(path, reference)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_shard_alone_is_recomputed(calibrated, damage):
    out, reference = calibrated
    (victim,) = (out / ".work").glob("attn-target-calibration-1-2-*.safetensors")
    whole = file_ref(victim)
    if damage == "delete":
        victim.unlink()
    else:  # as a killed writer without the atomic rename would leave it
        victim.write_bytes(victim.read_bytes()[: whole.size // 2])
    path, states = rerun(out)
    attention = shards(states, "attention-")
    assert attention.pop("attention-target-calibration-1:2") == "Completed"
    assert len(attention) == 5 and set(attention.values()) == {"Cached"}, attention
    # the recomputed shard has the bytes it had, so the merge keyed on its hash stays cached
    assert file_ref(victim) == whole and states["merge_shards"] == {"Cached"}
    assert_same_tensors(path, reference)


def test_a_deleted_merged_file_and_windows_file_are_rewritten(calibrated):
    out, reference = calibrated
    (windows,) = (out / ".work").glob("windows-*.safetensors")
    windows.unlink()
    merged = sorted((out / ".work").glob("attn-draft-holdout-*.safetensors"), key=lambda p: len(p.name))[0]
    merged.write_bytes(b"")  # cut to nothing
    path, states = rerun(out)
    assert states["load_corpus"] == {"Completed"} and states["merge_shards"] == {"Cached", "Completed"}
    assert set(shards(states, "attention-").values()) == {"Cached"}  # same windows: same keys, shards intact
    assert_same_tensors(path, reference)


def test_latest_pointing_at_a_deleted_artifact_is_repointed(calibrated):
    out, reference = calibrated
    latest = out / "quick" / "latest.safetensors"
    latest.resolve().unlink()
    assert latest.is_symlink() and not latest.exists()
    path, _ = rerun(out, skip_if_unchanged=True)  # a dangling latest is no reason to skip
    assert latest.resolve() == path.resolve() and path.exists()
    assert_same_tensors(path, reference)


def test_a_cut_shard_is_recomputed_on_a_dask_worker(calibrated):
    # Last of the calibrate tests: a one-thread worker may round the recomputed shard differently (see
    # tests/test_calibrate_dask.py), so the folder no longer holds the reference's exact bytes afterwards.
    out, reference = calibrated
    (victim,) = (out / ".work").glob("attn-draft-holdout-0-1-*.safetensors")
    victim.write_bytes(victim.read_bytes()[:100])
    path, states = rerun(out, workers=1)  # the cache check runs in the worker, where the task does
    attention = shards(states, "attention-")
    assert attention.pop("attention-draft-holdout-0:1") == "Completed"
    assert len(attention) == 5 and set(attention.values()) == {"Cached"}, attention
    got, want = load_file(path), load_file(reference)
    assert torch.equal(got["layer_map"], want["layer_map"])
    torch.testing.assert_close(got["top_p"], want["top_p"], rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def evaluated(calibrated, tmp_path_factory):
    """``(artifact, output folder, first evaluation.json's content)``, the artifact a copy out of the way of the
    calibrate tests' deletions."""
    art = tmp_path_factory.mktemp("eval-artifact") / "quick.safetensors"
    shutil.copy(calibrated[1], art)
    out = tmp_path_factory.mktemp("eval-out")
    first = json.loads(Path(evaluate(artifact=str(art), output_dir=str(out), **EVAL)).read_text())
    return art, out, first


def reevaluate(art: Path, out: Path) -> tuple[dict, dict[str, set[str]], object]:
    state = evaluate(artifact=str(art), output_dir=str(out), return_state=True, **EVAL)
    return json.loads(Path(state.result()).read_text()), task_states(state), state


def assert_same_evaluation(a: dict, b: dict) -> None:
    assert a["methods"].keys() == b["methods"].keys() and a["text"] == b["text"]
    for name, row in a["methods"].items():
        assert b["methods"][name]["perplexity"] == row["perplexity"], name
        assert b["methods"][name]["kv_reduction_all_layers"] == row["kv_reduction_all_layers"], name


def shard_record(state, name: str) -> Path:
    """The file in Prefect's result storage that holds the cached result of evaluation shard ``name``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import get_current_settings

    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in subflows]}))
    (run,) = [r for r in runs if r.name == name]
    record = Path(get_current_settings().results.local_storage_path) / run.state.data.storage_key
    assert record.is_file(), record
    return record


def test_evaluate_after_its_output_folder_is_deleted(evaluated):
    art, out, first = evaluated
    shutil.rmtree(out)
    again, states, _ = reevaluate(art, out)
    # the shards carry their results (no file of the output folder): still valid, so still cached
    assert shards(states, "evaluate-texts-") == {"evaluate-texts-0:1": "Cached", "evaluate-texts-1:2": "Cached"}
    assert (out / "evaluation.json").is_file() and (out / "table.md").is_file()
    assert_same_evaluation(first, again)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_damaged_evaluation_shard_alone_is_recomputed(evaluated, damage):
    art, out, first = evaluated
    _, _, state = reevaluate(art, out)
    record = shard_record(state, "evaluate-texts-1:2")
    if damage == "delete":
        record.unlink()
    else:
        record.write_bytes(record.read_bytes()[: record.stat().st_size // 2])
    again, states, _ = reevaluate(art, out)
    assert shards(states, "evaluate-texts-") == {"evaluate-texts-0:1": "Cached", "evaluate-texts-1:2": "Completed"}
    assert_same_evaluation(first, again)
