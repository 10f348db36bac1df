"""Task results that name files: a cache hit is valid only while those files are there with the content they had.

Prefect keys a task's cache on its inputs and code and keeps the result in its own result storage, outside our
output folders. A task whose result is a file it wrote (windows or attention shards under ``<output-dir>/.work``)
would, once that file is deleted or truncated, still be answered from the cache with a path to nothing. So such
tasks return :class:`FileRef` (path, size, sha256) and take :data:`CACHED`, whose policy :class:`FilesIntact`
looks at the cached result before Prefect does: if any FileRef in it no longer matches its file, the key moves on
to a successor key, the lookup misses and that task alone runs again (its result is then cached under the
successor; the others stay cached). The check lives in the cache policy, not in the flows, so Prefect's own task
states are honest (``Cached`` only for results that are usable) and it holds wherever the task runs (Dask workers
included) with no wrapper at the call sites.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from specattn_runtime.fingerprint import file_sha256


@dataclass(frozen=True)
class FileRef:
    """A file a task wrote, as it was when written. ``os.fspath(ref)`` is its path, so ``load_file(ref)`` reads it;
    passed as a task input it keys that task on the file's content too."""

    path: str
    size: int
    sha256: str

    def __fspath__(self) -> str:
        return self.path

    def problem(self) -> str | None:
        """Why the file is no longer what this reference recorded, or ``None`` when it still is."""
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return "is missing"
        except OSError as e:
            return f"cannot be read ({e.strerror})"
        if size != self.size:
            return f"has {size} bytes, not the {self.size} it was written with"
        if file_sha256(self.path) != self.sha256:
            return "has different content (sha256) from what was written"
        return None


def file_ref(path: str | os.PathLike) -> FileRef:
    """Reference to ``path`` as it is now (call it right after the atomic write)."""
    p = Path(path)
    return FileRef(str(p), p.stat().st_size, file_sha256(p))


def file_refs(result: Any) -> list[FileRef]:
    """Every :class:`FileRef` inside a result (nested in dicts, lists and tuples)."""
    if isinstance(result, FileRef):
        return [result]
    if isinstance(result, dict):
        return [r for v in result.values() for r in file_refs(v)]
    if isinstance(result, (list, tuple)):
        return [r for v in result for r in file_refs(v)]
    return []


def stale_files(result: Any) -> list[str]:
    """``"<path> <problem>"`` for each file the result refers to that is gone or changed; empty: all intact."""
    return [f"{ref.path} {why}" for ref in file_refs(result) if (why := ref.problem()) is not None]


def successor_key(key: str) -> str:
    # Deterministic, so a later run walks the same chain and finds the recomputed result.
    return hashlib.sha256(f"{key}/recomputed".encode()).hexdigest()


@dataclass
class FilesIntact(CachePolicy):
    """``base``'s key while the result cached under it refers only to intact files; else the first successor key
    with no result yet or an intact one. Results holding no :class:`FileRef` behave exactly as under ``base``."""

    base: CachePolicy = field(default_factory=lambda: INPUTS + TASK_SOURCE)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        key = self.base.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        if key is None:
            return None
        store = task_ctx.result_store
        # exists() also says no to a record that cannot be read back (truncated): Prefect then runs the task.
        while store.exists(key):
            stale = stale_files(store.read(key).result)
            if not stale:
                return key
            # the task run's own log (the UI shows it beside the run), not a module logger
            get_run_logger().warning("cached result not reused: %s; running again", "; ".join(stale))
            key = successor_key(key)
        return key


# Survives a new process: results are persisted and keyed on the inputs and the task's code, and reused only
# while the files they name are intact.
CACHED = dict(cache_policy=FilesIntact(), persist_result=True)
