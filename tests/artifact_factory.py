"""Build small valid artifacts for tests (no calibration needed)."""

import json

import torch

from specattn_runtime.artifact import FORMAT, SCHEMA_VERSION, Artifact


def make_artifact(n_t=6, n_d=4, dense=2, curve_numel=0, seed=0) -> Artifact:
    g = torch.Generator().manual_seed(seed)
    layer_map = [-1] * dense + sorted(torch.randint(0, n_d, (n_t - dense,), generator=g).tolist())
    top_p = [1.0] * dense + (torch.rand(n_t - dense, generator=g) * 0.5 + 0.5).tolist()
    meta = {
        "format": FORMAT, "schema_version": str(SCHEMA_VERSION), "mode": "draft", "chunk_size": "16",
        "dense_layers": str(dense),
        "draft_model": json.dumps({"name": "d", "config_hash": "a", "weights_hash": "b", "n_layers": n_d}),
        "target_model": json.dumps({"name": "t", "config_hash": "c", "weights_hash": "d", "n_layers": n_t}),
        "tokenizer_hash": "e", "calibration_corpus": json.dumps({"name": "x", "sha256": "0", "tokens": 1}),
        "objective": json.dumps({"kind": "target_mass_recall", "recall_budget": 0.95}),
        "holdout_quality": json.dumps({}), "created_at": "2026-11-23T00:00:00+00:00", "specattn_version": "0",
    }
    curves = {"big": torch.rand(curve_numel, generator=g)} if curve_numel else {}
    return Artifact(torch.tensor(layer_map, dtype=torch.int32), torch.tensor(top_p, dtype=torch.float32),
                    torch.rand(n_t, n_d, generator=g), meta, curves)
