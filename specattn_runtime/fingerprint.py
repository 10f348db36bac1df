"""Content hashes that tie an artifact to the exact models and tokenizer it was calibrated on.

Calibration writes them into the artifact; the runtime recomputes them for the models it is given and refuses a
mismatch. They are also the cache keys of the calibration tasks, so they must be stable across processes and
machines: only file bytes and canonical JSON go in, never paths, timestamps or library versions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Config fields that change with the writer, not with the model.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_model_name_or_path", "_commit_hash",
                         "torch_dtype", "dtype", "architectures", "quantization_config", "use_cache"}
_READ_BLOCK = 16 * 1024 * 1024


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_hash(model_dir: str | Path) -> str:
    """sha256 of the model's ``config.json`` with writer-dependent keys dropped."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return _sha256_json({k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS})


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the model's weight files (names and bytes, in name order)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors or *.bin weight files")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


def tokenizer_hash(model_dir: str | Path) -> str:
    """sha256 of the tokenizer's vocabulary and merges (what decides token positions), from ``tokenizer.json``.

    Two models whose tokenizers hash equal split any text into the same token ids, which is what layer alignment
    needs: draft and target attention rows are compared position by position.
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise ValueError(f"{model_dir} has no tokenizer.json (a fast tokenizer is needed to compare tokenizers)")
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    added = sorted((t["id"], t["content"]) for t in tok.get("added_tokens", []))
    return _sha256_json({"type": model.get("type"), "vocab": model.get("vocab"),
                         "merges": model.get("merges"), "added": added})


def model_fingerprint(model_dir: str | Path, name: str | None = None) -> dict[str, str]:
    """``{"name", "config_hash", "weights_hash"}`` as stored in an artifact's ``draft_model`` / ``target_model``."""
    model_dir = Path(model_dir)
    return {"name": name or model_dir.name, "config_hash": config_hash(model_dir),
            "weights_hash": weights_hash(model_dir)}
