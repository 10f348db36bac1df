"""The calibration artifact: the one thing that passes from calibration to serving.

An artifact is a single ``.safetensors`` file (no pickle) holding

- ``layer_map`` int32 ``[n_target_layers]``: draft layer guiding each target layer, ``-1`` = dense layer (mode
  ``self``: the layer itself, ``j``, or ``-1``);
- ``top_p`` float32 ``[n_target_layers]``: nucleus threshold per target layer (1.0 on dense layers; mode ``self``:
  of the drafting's selection, per KV head);
- ``kl`` float32 ``[n_target_layers, n_draft_layers]``: the KL matrix the map was solved on (mode ``self``: no
  alignment, zeros ``[n_target_layers, n_target_layers]``);
- optional, together (schema 2): ``head_map`` int32 ``[n_target_layers, n_target_kv_heads]``, the draft KV head
  guiding each target KV head (``-1`` on dense layers), and ``top_p_head`` float32 (same shape), the per-head p:
  one chunk selection per (sparse layer, KV head). Without them (every schema 1 artifact) selection is
  head-averaged, one set per layer, with ``top_p``;
- optional (schema 3, mode ``draft``): ``draft_top_p`` float32 ``[n_draft_layers]``, the nucleus threshold of the
  draft's *own* sparse reading (sparse drafting: after a step's first, dense draft forward, each draft layer with
  p < 1 reads only the top-p chunks of that forward's attention; 1.0 = the layer drafts densely). Without it the
  draft reads its whole cache, as every schema 1 and 2 artifact does;
- optional ``curve.*`` tensors (calibration curves for reports),

plus string metadata in the safetensors header (see ``REQUIRED_METADATA``; ``WINDOW_METADATA`` is optional).
Structured metadata values are JSON strings. Both :func:`save_artifact` and :func:`load_artifact` run the same
:func:`validate_artifact`, so a file that was written can always be read back, and a file that loads is always
usable.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "specattn"
SCHEMA_VERSION = 3
# 1: no per-head tensors (loads as head-averaged selection); 1 and 2: no draft_top_p (the draft reads densely)
READABLE_SCHEMAS = ("1", "2", "3")
CURVE_PREFIX = "curve."
MODES = ("draft", "self")

# Metadata keys every artifact carries. Values are strings; those in JSON_METADATA are JSON documents.
REQUIRED_METADATA = (
    "format",
    "schema_version",
    "mode",
    "chunk_size",
    "dense_layers",
    "draft_model",
    "target_model",
    "tokenizer_hash",
    "calibration_corpus",
    "objective",
    "holdout_quality",
    "created_at",
    "specattn_version",
)
JSON_METADATA = ("draft_model", "target_model", "calibration_corpus", "objective", "holdout_quality")
# How the calibration windows began: ``window_prefix`` is a JSON list of the token ids the tokenizer puts before
# text (``[2]`` for Gemma's <bos>, ``[]`` for SmolLM2 and Qwen), ``windows_start_with_bos`` "true" / "false" (the
# prefix is non-empty). Optional, both or neither: artifacts written before they existed have neither (and were
# calibrated on windows without any prefix); the runtime warns when a prompt lacks the prefix calibration saw.
WINDOW_METADATA = ("windows_start_with_bos", "window_prefix")
# The safetensors header is a little-endian u64 length followed by that much JSON; anything claiming more than
# this is not an artifact (ours are a few KiB of header).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class ArtifactError(ValueError):
    """An artifact file is missing, corrupt, or inconsistent with itself or with the models it is used with."""


@dataclass(frozen=True)
class Artifact:
    """In-memory form of a calibration artifact.

    Parameters
    ----------
    layer_map : torch.Tensor
        int32 ``[n_target_layers]``; ``-1`` marks a dense layer.
    top_p : torch.Tensor
        float32 ``[n_target_layers]`` in ``(0, 1]``; exactly 1.0 on dense layers.
    kl : torch.Tensor
        float32 ``[n_target_layers, n_draft_layers]``, finite and ``>= 0``.
    metadata : dict[str, str]
        Header strings; see ``REQUIRED_METADATA``.
    curves : dict[str, torch.Tensor]
        Optional float32 report tensors, stored as ``curve.<name>``.
    head_map, top_p_head : torch.Tensor, optional
        int32 / float32 ``[n_target_layers, n_target_kv_heads]``: per-KV-head guidance (both or neither).
    draft_top_p : torch.Tensor, optional
        float32 ``[n_draft_layers]`` in ``(0, 1]``: the draft's own top-p (sparse drafting; 1.0 = dense layer).
    """

    layer_map: torch.Tensor
    top_p: torch.Tensor
    kl: torch.Tensor
    metadata: dict[str, str]
    curves: dict[str, torch.Tensor] = field(default_factory=dict)
    head_map: torch.Tensor | None = None
    top_p_head: torch.Tensor | None = None
    draft_top_p: torch.Tensor | None = None

    @property
    def n_target_layers(self) -> int:
        return int(self.layer_map.numel())

    @property
    def n_draft_layers(self) -> int:
        return int(self.kl.shape[1])

    @property
    def per_head(self) -> bool:
        """Whether the artifact selects one chunk set per (sparse layer, KV head)."""
        return self.head_map is not None

    @property
    def sparse_draft(self) -> bool:
        """Whether some draft layer reads sparsely (a ``draft_top_p`` below 1)."""
        return self.draft_top_p is not None and bool((self.draft_top_p < 1).any())

    @property
    def chunk_size(self) -> int:
        return int(self.metadata["chunk_size"])

    @property
    def dense_layers(self) -> int:
        return int(self.metadata["dense_layers"])

    @property
    def window_prefix(self) -> list[int] | None:
        """Token ids every calibration window began with; ``None`` for artifacts that do not record it."""
        return json.loads(self.metadata["window_prefix"]) if "window_prefix" in self.metadata else None

    def info(self, key: str) -> dict:
        """Decoded JSON metadata value (e.g. ``info("target_model")["config_hash"]``)."""
        if key not in JSON_METADATA:
            raise KeyError(f"{key!r} is not a JSON metadata field; JSON fields are {JSON_METADATA}")
        return json.loads(self.metadata[key])


def window_metadata(prefix: list[int]) -> dict[str, str]:
    """The ``WINDOW_METADATA`` strings for calibration windows that began with ``prefix``."""
    return {"windows_start_with_bos": "true" if prefix else "false", "window_prefix": json.dumps(list(prefix))}


def _fail(path: str | os.PathLike | None, message: str) -> ArtifactError:
    where = f"{path}: " if path is not None else ""
    return ArtifactError(where + message)


def validate_artifact(art: Artifact, path: str | os.PathLike | None = None) -> None:
    """Check schema, shapes, dtypes and value ranges; raise :class:`ArtifactError` naming the first problem."""
    md = art.metadata
    missing = [k for k in REQUIRED_METADATA if k not in md]
    if missing:
        raise _fail(path, f"metadata is missing {missing}; this is not a complete SpecAttn artifact")
    if md["format"] != FORMAT:
        raise _fail(path, f"metadata format is {md['format']!r}, expected {FORMAT!r}")
    if md["schema_version"] not in READABLE_SCHEMAS:
        raise _fail(
            path,
            f"schema_version is {md['schema_version']!r} but this specattn reads versions {READABLE_SCHEMAS}; "
            "recalibrate with this version or install the specattn that wrote it",
        )
    if md["mode"] not in MODES:
        raise _fail(path, f"mode is {md['mode']!r}, expected one of {MODES}")
    for key in JSON_METADATA:
        try:
            value = json.loads(md[key])
        except json.JSONDecodeError as e:
            raise _fail(path, f"metadata {key!r} is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise _fail(path, f"metadata {key!r} must be a JSON object, got {type(value).__name__} {md[key][:40]!r}")
    for key in ("chunk_size", "dense_layers"):
        try:
            int(md[key])
        except ValueError:
            raise _fail(path, f"metadata {key!r} is {md[key]!r}, expected an integer") from None
    if art.chunk_size <= 0:
        raise _fail(path, f"chunk_size is {art.chunk_size}, must be > 0")

    lm, tp, kl = art.layer_map, art.top_p, art.kl
    if lm.dtype != torch.int32 or lm.ndim != 1 or lm.numel() == 0:
        raise _fail(path, f"layer_map must be non-empty int32 [n_target_layers], got {lm.dtype} {tuple(lm.shape)}")
    n_t = lm.numel()
    if tp.dtype != torch.float32 or tuple(tp.shape) != (n_t,):
        raise _fail(path, f"top_p must be float32 [{n_t}] like layer_map, got {tp.dtype} {tuple(tp.shape)}")
    if kl.dtype != torch.float32 or kl.ndim != 2 or kl.shape[0] != n_t or kl.shape[1] == 0:
        raise _fail(path, f"kl must be float32 [{n_t}, n_draft_layers], got {kl.dtype} {tuple(kl.shape)}")
    n_d = kl.shape[1]
    if not torch.isfinite(kl).all() or (kl < 0).any():
        raise _fail(path, "kl has NaN, infinite or negative entries")
    if ((lm < -1) | (lm >= n_d)).any():
        raise _fail(path, f"layer_map values must be -1 (dense) or in [0, {n_d - 1}], got {lm.tolist()}")
    if not torch.isfinite(tp).all() or ((tp <= 0) | (tp > 1)).any():
        raise _fail(path, f"top_p values must lie in (0, 1], got {tp.tolist()}")
    dense = lm == -1
    if (tp[dense] != 1.0).any():
        raise _fail(path, "dense layers (layer_map == -1) must have top_p == 1.0")
    if not 0 <= art.dense_layers <= n_t:
        raise _fail(path, f"dense_layers is {art.dense_layers}, must be in [0, {n_t}]")
    if not dense[: art.dense_layers].all():
        raise _fail(path, f"the first dense_layers={art.dense_layers} target layers must be dense (layer_map -1)")
    mapped = lm[~dense]
    if mapped.numel() > 1 and (mapped[1:] < mapped[:-1]).any():
        raise _fail(path, f"layer_map must be non-decreasing over sparse layers, got {lm.tolist()}")
    if md["mode"] == "self":  # one model: each sparse layer is guided by its own last verification
        own = torch.arange(n_t, dtype=lm.dtype)
        if n_d != n_t or (~dense & (lm != own)).any():
            raise _fail(path, f"a mode 'self' artifact maps each sparse layer to itself (layer_map[j] = j or -1) "
                              f"over a [{n_t}, {n_t}] kl; got layer_map {lm.tolist()}, kl {tuple(kl.shape)}")
    _validate_window_metadata(md, path)
    _validate_heads(art, path)
    _validate_draft_top_p(art, path)
    for name, t in art.curves.items():
        if t.dtype != torch.float32 or not torch.isfinite(t).all():
            raise _fail(path, f"curve {name!r} must be finite float32, got {t.dtype}")


def _validate_window_metadata(md: dict[str, str], path) -> None:
    present = [k for k in WINDOW_METADATA if k in md]
    if not present:
        return  # written before windows recorded their prefix: loads as before
    if len(present) != len(WINDOW_METADATA):
        raise _fail(path, f"metadata has {present} but not the rest of {list(WINDOW_METADATA)}; write both")
    try:
        prefix = json.loads(md["window_prefix"])
    except json.JSONDecodeError as e:
        raise _fail(path, f"metadata 'window_prefix' is not valid JSON ({e})") from None
    if not isinstance(prefix, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                               for x in prefix):
        raise _fail(path, "metadata 'window_prefix' must be a JSON list of token ids >= 0, got "
                          f"{md['window_prefix']!r}")
    if md["windows_start_with_bos"] != ("true" if prefix else "false"):
        raise _fail(path, f"metadata 'windows_start_with_bos' is {md['windows_start_with_bos']!r} but window_prefix "
                          f"is {prefix}; expected {'true' if prefix else 'false'!r}")


def _validate_heads(art: Artifact, path) -> None:
    hm, tp = art.head_map, art.top_p_head
    if hm is None and tp is None:
        return
    if hm is None or tp is None:
        raise _fail(path, "head_map and top_p_head come together (per-head selection); one is missing")
    if art.metadata["schema_version"] == "1" or art.metadata["mode"] != "draft":
        raise _fail(path, "per-head tensors need schema_version 2 or later and mode 'draft'")
    n_t = art.n_target_layers
    if hm.dtype != torch.int32 or hm.ndim != 2 or hm.shape[0] != n_t or hm.shape[1] == 0:
        raise _fail(path, f"head_map must be int32 [{n_t}, n_kv_heads], got {hm.dtype} {tuple(hm.shape)}")
    if tp.dtype != torch.float32 or tuple(tp.shape) != tuple(hm.shape):
        raise _fail(path, f"top_p_head must be float32 {tuple(hm.shape)} like head_map, got {tp.dtype} "
                          f"{tuple(tp.shape)}")
    dense = (art.layer_map == -1)[:, None].expand_as(hm)
    if ((hm == -1) != dense).any() or (hm < -1).any():
        raise _fail(path, "head_map must be -1 on exactly the dense layers' rows and a draft KV head (>= 0) elsewhere")
    if not torch.isfinite(tp).all() or ((tp <= 0) | (tp > 1)).any() or (tp[dense] != 1.0).any():
        raise _fail(path, "top_p_head values must lie in (0, 1], and be 1.0 on dense layers")


def _validate_draft_top_p(art: Artifact, path) -> None:
    dp = art.draft_top_p
    if dp is None:
        return
    if art.metadata["schema_version"] in ("1", "2") or art.metadata["mode"] != "draft":
        raise _fail(path, "draft_top_p (sparse drafting) needs schema_version 3 or later and mode 'draft'")
    if dp.dtype != torch.float32 or tuple(dp.shape) != (art.n_draft_layers,):
        raise _fail(path, f"draft_top_p must be float32 [{art.n_draft_layers}] (one p per draft layer, like kl's "
                          f"columns), got {dp.dtype} {tuple(dp.shape)}")
    if not torch.isfinite(dp).all() or ((dp <= 0) | (dp > 1)).any():
        raise _fail(path, f"draft_top_p values must lie in (0, 1], got {dp.tolist()}")


_TEMP_PID = re.compile(r"^\..+\.pid(\d+)\.[^/]*tmp$")


def temp_prefix(path: Path) -> str:
    """Prefix of a writer's temporary file beside ``path``: it names the writer's pid, so that a later writer can
    tell a file left by a killed process (see :func:`clean_stale_temps`) from one being written now."""
    return f".{path.name}.pid{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files in ``directory`` whose writing process no longer exists; returns them.

    Only names made with :func:`temp_prefix` are considered; a file whose pid is alive (its writer, or an
    unrelated process that reused the pid) is kept."""
    removed = []
    for f in Path(directory).glob(".*tmp"):
        m = _TEMP_PID.match(f.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def save_artifact(art: Artifact, path: str | os.PathLike) -> Path:
    """Validate and write ``art`` to ``path`` atomically.

    The bytes go to a temporary file in the same directory, are fsynced, then ``os.replace`` moves them over
    ``path``: a reader (or a crash) sees either the old file or the complete new one, never half of one.
    """
    validate_artifact(art)
    path = Path(path)
    tensors = {"layer_map": art.layer_map.contiguous(), "top_p": art.top_p.contiguous(), "kl": art.kl.contiguous()}
    if art.per_head:
        tensors.update(head_map=art.head_map.contiguous(), top_p_head=art.top_p_head.contiguous())
    if art.draft_top_p is not None:
        tensors["draft_top_p"] = art.draft_top_p.contiguous()
    tensors.update({CURVE_PREFIX + k: v.contiguous() for k, v in art.curves.items()})
    clean_stale_temps(path.parent)  # what a killed writer left behind
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(art.metadata))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # temp files are 0600; an artifact is shared like any other output file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_header(path: Path) -> None:
    """Reject non-safetensors files (pickles, truncated downloads) with a readable message before safetensors does."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"file is {size} bytes: too short to be a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise _fail(
                path,
                "not a safetensors file, or truncated: the header length field does not fit the file "
                "(a pickle or .pt file renamed .safetensors looks like this)",
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _fail(path, "the safetensors header is not valid JSON: the file is corrupt") from None
    if not isinstance(header, dict):
        raise _fail(path, f"the safetensors header is a JSON {type(header).__name__}, not an object: the file is "
                          "corrupt")
    ends = []
    for k, v in header.items():
        if k == "__metadata__":
            continue
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _fail(path, f"the safetensors header entry {k!r} has no valid data_offsets: the file is corrupt")
        ends.append(offsets[1])
    if ends and 8 + n + max(ends) > size:
        raise _fail(path, f"file is truncated: tensors need {8 + n + max(ends)} bytes, the file has {size}")


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read and validate an artifact; every problem is an :class:`ArtifactError` (a ``ValueError``).

    Parameters
    ----------
    path : str or PathLike
        A ``.safetensors`` artifact (``latest.safetensors`` symlinks are followed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no artifact at {path}; run calibration first (see README) or check the path")
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; pass the .safetensors file (e.g. {path}/latest.safetensors)")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = set(f.keys())
            missing = {"layer_map", "top_p", "kl"} - keys
            if missing:
                raise _fail(path, f"tensors {sorted(missing)} are missing; this is not a SpecAttn artifact")
            tensors = {k: f.get_tensor(k) for k in keys}
    except SafetensorError as e:
        raise _fail(path, f"cannot be read as safetensors ({e}); the file is corrupt") from None
    curves = {k[len(CURVE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CURVE_PREFIX)}
    art = Artifact(tensors["layer_map"], tensors["top_p"], tensors["kl"], metadata, curves,
                   tensors.get("head_map"), tensors.get("top_p_head"), tensors.get("draft_top_p"))
    validate_artifact(art, path)
    return art


def update_latest(art_path: str | os.PathLike, name: str = "latest.safetensors") -> Path:
    """Point ``<dir>/latest.safetensors`` at ``art_path`` atomically (relative symlink, swapped by ``os.replace``)."""
    art_path = Path(art_path)
    link = art_path.parent / name
    tmp = art_path.parent / f"{temp_prefix(link)}tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(art_path.name, tmp)
    os.replace(tmp, link)
    return link
