"""Attention collection sharded over windows and models: in this process, or on a Dask cluster through Prefect.

The ``calibrate`` flow runs :func:`collect_attention` as a subflow whose task runner is chosen by
:func:`task_runner`: none (one shard after another here, as before), ``workers=N`` (a ``distributed.LocalCluster``
of N worker processes started for the run) or ``dask_address="tcp://host:8786"`` (an existing cluster). Each shard
is a window range of one model on one split (:func:`pipelines.calibration_tasks.collect_attention_shard`): task-cached
on its inputs, so a re-run after a crash recomputes only the shards that did not finish (and, as the cache reuses a
shard only while its file is intact, :mod:`pipelines.file_results`, those whose files were deleted or cut). Shards
are merged in window order, so the rows — and the artifact — do not depend on how many workers computed them (each
window is computed by the same operations; only float threading inside a matrix product could differ between
processes).

On a real cluster the work directory (windows file, shard files) and Prefect's result storage
(``PREFECT_LOCAL_STORAGE_PATH``) must be on storage every worker sees, and the model directories at the same path.
"""

from __future__ import annotations

import argparse
import re
from contextlib import nullcontext

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from . import calibration_tasks as T
from .attention_stats import recording_model

ROLES, SPLITS = ("draft", "target"), ("calibration", "holdout")


def check_cluster_params(dask_address: str | None, workers: int, windows_per_shard: int,
                         dask_resources: dict | None) -> None:
    """Plain checks (no cluster is contacted), called with the flow's other parameter checks."""
    if dask_address is not None and not re.fullmatch(r"(tcp|tls|inproc|ucx)://[^\s/]+(:\d+)?", str(dask_address)):
        raise ValueError(f"dask_address must look like tcp://host:8786, got {dask_address!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0 (0: no local cluster), got {workers!r}")
    if dask_address is not None and workers:
        raise ValueError("pass dask_address (an existing cluster) or workers (a local cluster), not both")
    if isinstance(windows_per_shard, bool) or not isinstance(windows_per_shard, int) or windows_per_shard < 1:
        raise ValueError(f"windows (texts) per shard must be an integer >= 1, got {windows_per_shard!r}")
    if dask_resources is not None and (not isinstance(dask_resources, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in dask_resources.items())):
        raise ValueError(f"dask_resources must map resource names to positive amounts, e.g. {{'GPU': 1}}; "
                         f"got {dask_resources!r}")


def parse_resources(text: str) -> dict[str, float]:
    """Command-line form of ``dask_resources``: ``GPU=1,MEM=2`` -> ``{"GPU": 1.0, "MEM": 2.0}``."""
    try:
        return {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT[,NAME=AMOUNT...], got {text!r}") from None


def task_runner(dask_address: str | None = None, workers: int = 0):
    """The task runner of the collection subflow (see the module docstring)."""
    if dask_address is None and not workers:
        return ThreadPoolTaskRunner(max_workers=1)  # in this process, one model pass at a time
    from prefect_dask import DaskTaskRunner

    if dask_address is not None:
        return DaskTaskRunner(address=dask_address)
    # one thread per worker process: model passes hold the GIL between kernels, and torch uses the cores
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": workers, "processes": True, "threads_per_worker": 1,
                                          "dashboard_address": None})


@flow(name="collect-attention", log_prints=True)
def collect_attention(models: dict, corpus_info: dict, queries_per_window: int, chunk_size: int, work_dir: str,
                      windows_per_shard: int = 8, dask_resources: dict | None = None,
                      progress: bool = True) -> dict[str, str]:
    """``{"<role>/<split>": rows file path}`` for both models on both splits (files as the single-process path
    wrote)."""
    log = get_run_logger()
    n_windows = {"calibration": corpus_info["windows"], "holdout": corpus_info["holdout_windows"]}
    jobs: dict[tuple[str, str], list] = {}
    for role in ROLES:  # one model's shards back to back: a worker keeps the model it loaded
        for split in SPLITS:
            args = [(models[role], corpus_info["path"], corpus_info["windows_sha256"], split, start, stop,
                     queries_per_window, chunk_size, role, work_dir)
                    for start, stop in T.shard_ranges(n_windows[split], windows_per_shard)]
            with annotate(dask_resources):
                jobs[role, split] = [T.collect_attention_shard.submit(*a) for a in args]
    futures = [f for group in jobs.values() for f in group]
    log.info("%d attention shards (%d windows each at most)", len(futures), windows_per_shard)
    wait_with_progress(futures, "attention shards", progress)
    out = {}
    for (role, split), group in jobs.items():
        merged = T.merge_shards([f.result() for f in group], corpus_info["path"], split, queries_per_window,
                                chunk_size, role, work_dir)
        out[f"{role}/{split}"] = merged.path
    recording_model.cache_clear()  # this process may have run shards: free the model it kept
    return out


def wait_with_progress(futures: list, what: str, progress: bool = True) -> None:
    """One progress bar for a flow's shards, however many workers run them."""
    with tqdm(total=len(futures), desc=what, unit="shard", disable=not progress) as bar:
        for _ in as_completed(futures):
            bar.update(1)


def annotate(resources: dict | None):
    """Dask resources for the tasks submitted inside (``{"GPU": 1}``: GPU workers only); nothing when None."""
    if not resources:
        return nullcontext()
    import dask

    return dask.annotate(resources=resources)

