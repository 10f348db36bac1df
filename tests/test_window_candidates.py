"""Short sliding windows stay dense (pipelines/candidates.py): calibration makes a window layer a sparse candidate
only when its window holds at least ``min_sparse_window`` tokens.

The calibrate flow, under a Prefect test harness, on tests/test_bos_windows.py's tiny random Gemma 3 (layers: sliding
16, full, sliding 16) as its own draft, on a corpus of its words: with the default rule its two window layers stay
dense in the target's map, in the draft's own top-p and in mode ``self``; with ``min_sparse_window=0`` they are
candidates like the full layer.
"""

import json

import pytest

from pipelines.calibrate import calibrate
from pipelines.candidates import short_window_layers, sparse_candidates
from specattn_runtime.artifact import load_artifact
from test_bos_windows import gemma_dir, text  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow
TINY = dict(window_tokens=64, num_windows=2, holdout_windows=1, queries_per_window=8, dense_layers=0, draft_k=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six documents of the tiny tokenizer's words (one per file; every fifth is held out)."""
    folder = tmp_path_factory.mktemp("words")
    for seed in range(6):
        (folder / f"doc{seed}.txt").write_text(text(seed, 200))
    return str(folder)


def test_the_rule():
    windows = [16, None, 4096, 2047, None]
    assert short_window_layers(windows) == [0, 3]
    assert sparse_candidates(windows, 1) == [1, 2, 4]
    assert short_window_layers(windows, 0) == [] and sparse_candidates(windows, 0, 5000) == [1, 4]
    with pytest.raises(ValueError, match="min_sparse_window"):
        short_window_layers(windows, -1)


def test_short_windows_stay_dense_in_draft_mode(prefect_harness, gemma_dir, corpus, tmp_path):  # noqa: F811
    art = load_artifact(calibrate(draft=str(gemma_dir), target=str(gemma_dir), corpus=corpus,
                                  output_dir=str(tmp_path / "rule"), **TINY))
    assert art.layer_map.tolist()[0] == art.layer_map.tolist()[2] == -1 and art.layer_map[1] >= 0
    assert art.top_p[0] == art.top_p[2] == 1.0
    assert art.draft_top_p[0] == art.draft_top_p[2] == 1.0  # the draft's own window layers draft densely
    objective = json.loads(art.metadata["objective"])
    assert objective["window_dense_layers"] == [0, 2] and objective["min_sparse_window"] == 2048
    assert objective["sparse_draft"]["window_dense_layers"] == [0, 2]

    every = load_artifact(calibrate(draft=str(gemma_dir), target=str(gemma_dir), corpus=corpus,
                                    output_dir=str(tmp_path / "all"), min_sparse_window=0, **TINY))
    assert (every.layer_map >= 0).all()
    assert json.loads(every.metadata["objective"])["window_dense_layers"] == []
    assert every.metadata["input_fingerprint"] != art.metadata["input_fingerprint"]


def test_short_windows_stay_dense_in_self_mode(prefect_harness, gemma_dir, corpus, tmp_path):  # noqa: F811
    art = load_artifact(calibrate(mode="self", target=str(gemma_dir), corpus=corpus, output_dir=str(tmp_path),
                                  **TINY))
    assert art.layer_map.tolist()[0] == art.layer_map.tolist()[2] == -1
    assert json.loads(art.metadata["objective"])["window_dense_layers"] == [0, 2]


def test_bad_min_sparse_window_is_refused():
    from pipelines.calibrate import check_params

    with pytest.raises(ValueError, match="min_sparse_window"):
        check_params(preset="quick", min_sparse_window=-5)
