"""Content hashes that tie an artifact to the exact models and tokenizer it was calibrated on.

Calibration writes them into the artifact; the runtime recomputes them for the models it is given and refuses a
mismatch. They are also the cache keys of the calibration tasks, so they must be stable across processes and
machines: only file bytes and canonical JSON go in, never paths, timestamps or library versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
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


def cache_dir() -> Path:
    """Where SpecAttn keeps what it fetches and remembers: ``$SPECATTN_CACHE``, default ``~/.cache/specattn``."""
    return Path(os.environ.get("SPECATTN_CACHE", "~/.cache/specattn")).expanduser()


HASH_STORE = "file-hashes.json"
# A file changed within this long of being hashed is not remembered: file times tick coarsely (a few ms on Linux),
# so a rewrite of the same size inside one tick could leave the stat unchanged (git's "racily clean" case).
FRESH_NS = 1_000_000_000


def _stat_stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read_store(store: Path) -> dict:
    try:
        data = json.loads(store.read_text())
    except (OSError, ValueError):  # none yet, unreadable or corrupt: start again
        return {}
    return data if isinstance(data, dict) else {}


def _write_store(store: Path, data: dict) -> None:
    """Atomically (temporary file + ``os.replace``); a store that cannot be written is skipped, not an error."""
    tmp = None
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=store.parent, prefix=f".{store.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, store)
    except OSError:
        if tmp is not None:  # a full disk mid-write: leave no temporary behind
            Path(tmp).unlink(missing_ok=True)


def remembered_file_sha256(path: str | Path) -> str:
    """:func:`file_sha256`, remembered in ``<cache_dir>/file-hashes.json`` under the file's real path and its stat
    (device, inode, size, modification and change times in ns: what git's index trusts).

    Weight files of many gigabytes are then read once, not at every load (sha256 runs at ~0.45 GB/s on a 2-core
    machine: ~35 s for Llama-3.1-8B's 16 GB). Any write to the file, or another file moved into its place, changes
    its change time or inode, and it is hashed again; one changed less than ``FRESH_NS`` ago is never remembered.
    """
    path = Path(path)
    key, store = str(path.resolve()), cache_dir() / HASH_STORE
    stamp = _stat_stamp(path)
    entry = _read_store(store).get(key)
    if isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = file_sha256(path)
    if _stat_stamp(path) == stamp and time.time_ns() - max(stamp[3], stamp[4]) > FRESH_NS:
        data = _read_store(store)  # re-read: another process may have added entries meanwhile
        data = {k: v for k, v in data.items() if os.path.exists(k)}  # forget files that are gone
        data[key] = {"stat": stamp, "sha256": digest}
        _write_store(store, data)
    return digest


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the model's weight files (names and bytes, in name order; each file's hash remembered by its
    stat, :func:`remembered_file_sha256`)."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors or *.bin weight files")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(bytes.fromhex(remembered_file_sha256(f)))
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
