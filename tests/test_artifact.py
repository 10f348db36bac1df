import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from artifact_factory import make_artifact
from specattn_runtime.artifact import ArtifactError, load_artifact, save_artifact, update_latest


def test_round_trip_and_safe_open(tmp_path):
    art = make_artifact(curve_numel=10)
    path = save_artifact(art, tmp_path / "a.safetensors")
    back = load_artifact(path)
    assert torch.equal(back.layer_map, art.layer_map) and torch.equal(back.top_p, art.top_p)
    assert torch.equal(back.kl, art.kl) and torch.equal(back.curves["big"], art.curves["big"])
    assert back.metadata == art.metadata
    with safe_open(str(path), framework="pt") as f:  # plain safetensors, readable without specattn
        assert set(f.keys()) == {"layer_map", "top_p", "kl", "curve.big"}
    assert back.info("target_model")["n_layers"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "temp file left behind"


def _replace(art, **kw):
    return dataclasses.replace(art, **kw)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: _replace(a, top_p=torch.full_like(a.top_p, 1.5)), "top_p values"),
    (lambda a: _replace(a, top_p=torch.zeros_like(a.top_p)), "top_p values"),
    (lambda a: _replace(a, layer_map=a.layer_map.flip(0)), "dense|non-decreasing"),
    (lambda a: _replace(a, layer_map=torch.full_like(a.layer_map, 9)), "layer_map values"),
    (lambda a: _replace(a, layer_map=a.layer_map.long()), "int32"),
    (lambda a: _replace(a, kl=a.kl[:, :0]), "kl must be"),
    (lambda a: _replace(a, kl=-a.kl), "negative"),
    (lambda a: _replace(a, top_p=a.top_p[:-1]), "top_p must be"),
    (lambda a: _replace(a, metadata={k: v for k, v in a.metadata.items() if k != "tokenizer_hash"}), "missing"),
    (lambda a: _replace(a, metadata={**a.metadata, "schema_version": "99"}), "schema_version"),
    (lambda a: _replace(a, metadata={**a.metadata, "chunk_size": "0"}), "chunk_size"),
    (lambda a: _replace(a, metadata={**a.metadata, "mode": "turbo"}), "mode"),
    (lambda a: _replace(a, metadata={**a.metadata, "objective": "{not json"}), "not valid JSON"),
    (lambda a: _replace(a, draft_top_p=torch.full((a.n_draft_layers,), 1.2)), "draft_top_p values"),
    (lambda a: _replace(a, draft_top_p=torch.full((a.n_draft_layers,), float("nan"))), "draft_top_p values"),
    (lambda a: _replace(a, draft_top_p=torch.ones(a.n_draft_layers + 1)), r"draft_top_p must be float32 \["),
    (lambda a: _replace(a, draft_top_p=torch.ones(a.n_draft_layers, dtype=torch.float64)), "draft_top_p must be"),
    (lambda a: _replace(a, draft_top_p=torch.ones(a.n_draft_layers), metadata={**a.metadata, "schema_version": "2"}),
     "schema_version 3"),
])
def test_invalid_artifacts_are_refused_on_write(tmp_path, mutate, match):
    with pytest.raises(ArtifactError, match=match):
        save_artifact(mutate(make_artifact()), tmp_path / "bad.safetensors")
    assert list(tmp_path.iterdir()) == [], "a refused artifact must leave nothing behind"


def test_draft_top_p_round_trip_and_older_schemas(tmp_path):
    art = make_artifact()
    dp = torch.linspace(0.5, 1.0, art.n_draft_layers)
    back = load_artifact(save_artifact(_replace(art, draft_top_p=dp), tmp_path / "sparse_draft.safetensors"))
    assert torch.equal(back.draft_top_p, dp) and back.sparse_draft
    for schema in ("1", "2"):  # older artifacts load and draft densely
        old = load_artifact(save_artifact(_replace(art, metadata={**art.metadata, "schema_version": schema}),
                                          tmp_path / f"v{schema}.safetensors"))
        assert old.draft_top_p is None and not old.sparse_draft
    dense = _replace(art, draft_top_p=torch.ones(art.n_draft_layers))
    assert not load_artifact(save_artifact(dense, tmp_path / "dense_draft.safetensors")).sparse_draft


def test_corrupt_files_give_clear_errors(tmp_path):
    good = save_artifact(make_artifact(curve_numel=1000), tmp_path / "good.safetensors")
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "tiny": data[:5],
        "empty": b"",
        "garbage": os.urandom(4096),
        "pickle": pickle.dumps({"layer_map": [0, 1]}),
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(ArtifactError) as e:
            load_artifact(p)
        assert str(p) in str(e.value), f"{name}: error must name the file: {e.value}"
    torch.save({"layer_map": torch.zeros(3)}, tmp_path / "pt.safetensors")
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load_artifact(tmp_path / "pt.safetensors")
    with pytest.raises(FileNotFoundError, match="no artifact"):
        load_artifact(tmp_path / "nope.safetensors")
    with pytest.raises(ArtifactError, match="directory"):
        load_artifact(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import save_file

    art = make_artifact()
    save_file({"layer_map": art.layer_map, "kl": art.kl}, str(tmp_path / "x.safetensors"), metadata=art.metadata)
    with pytest.raises(ArtifactError, match="top_p"):
        load_artifact(tmp_path / "x.safetensors")


def test_update_latest_points_at_newest(tmp_path):
    a = save_artifact(make_artifact(seed=1), tmp_path / "1.safetensors")
    b = save_artifact(make_artifact(seed=2), tmp_path / "2.safetensors")
    update_latest(a)
    link = update_latest(b)
    assert torch.equal(load_artifact(link).kl, load_artifact(b).kl)


_WRITER = """
import sys, torch
sys.path.insert(0, {tests!r})
from artifact_factory import make_artifact
from specattn_runtime.artifact import save_artifact, update_latest
from pathlib import Path
out = Path({out!r})
i = 0
while True:
    i += 1
    p = save_artifact(make_artifact(seed=i, curve_numel=4_000_000), out / f"{{i:05d}}.safetensors")
    update_latest(p)
    print(i, flush=True)
"""


def test_killed_writer_never_leaves_a_broken_latest(tmp_path):
    """SIGKILL a process that keeps writing 16 MB artifacts: whatever it was doing, every visible artifact and
    latest stay loadable; only hidden temp files can be left behind."""
    tests = os.path.dirname(__file__)
    for delay in (0.9, 1.7, 2.3):
        out = tmp_path / f"run{delay}"
        out.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(tests=tests, out=str(out))],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1", "writer did not start"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        visible = sorted(p for p in out.iterdir() if not p.name.startswith("."))
        assert (out / "latest.safetensors") in visible
        for p in visible:
            load_artifact(p)  # raises if any visible file is partial


def test_a_killed_writers_temporary_files_are_cleaned_on_the_next_write(tmp_path):
    """Temporary names carry the writer's pid: the next write deletes those of dead processes, nobody else's."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".a.safetensors.pid{dead}.k3j2_x.tmp"
    live = tmp_path / f".b.safetensors.pid{os.getppid()}.tmp"  # a live process: maybe writing right now
    other = tmp_path / ".unrelated.tmp"  # not one of ours
    for f in (stale, live, other):
        f.write_bytes(b"partial")
    save_artifact(make_artifact(), tmp_path / "c.safetensors")
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "c.safetensors"])
