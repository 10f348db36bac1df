"""Calibration with attention shards on Dask (a real ``distributed.LocalCluster`` of worker processes) through
Prefect: the same artifact as one process, a worker killed mid-shard, a flow killed mid-run and started again."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.calibrate import calibrate
from specattn_runtime.artifact import load_artifact

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# 4 + 2 windows, one per shard: 12 shards over the two models
TINY = dict(window_tokens=128, num_windows=4, holdout_windows=2, queries_per_window=8, windows_per_shard=1)


@pytest.fixture(scope="module")
def single_process(prefect_harness, quick_pair, tmp_path_factory):
    return load_artifact(calibrate(preset="quick", output_dir=str(tmp_path_factory.mktemp("single")), **TINY))


def assert_same_artifact(a, b):
    """Equal maps; tensors equal up to float threading: Dask workers run torch on one thread, this process on all
    cores, and a matrix product's sums may then round differently (measured: KL within 4e-7, p within 1e-4)."""
    assert a.layer_map.tolist() == b.layer_map.tolist()
    torch.testing.assert_close(a.kl, b.kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.top_p, b.top_p, rtol=0, atol=1e-3)
    assert a.metadata["input_fingerprint"] == b.metadata["input_fingerprint"]


def test_two_local_workers_write_the_single_process_artifact(single_process, tmp_path):
    art = load_artifact(calibrate(preset="quick", output_dir=str(tmp_path), workers=2, **TINY))
    assert_same_artifact(art, single_process)


def test_a_worker_killed_while_holding_a_shard_does_not_change_the_artifact(single_process, tmp_path):
    from distributed import Client, LocalCluster

    killed: list[int] = []
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        done = threading.Event()

        def kill_one_busy_worker():
            while not done.is_set() and not killed:
                for addr, keys in client.processing().items():
                    if keys:  # this worker holds a shard now
                        pid = client.run(os.getpid, workers=[addr])[addr]
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_one_busy_worker, daemon=True)
        killer.start()
        try:
            path = calibrate(preset="quick", output_dir=str(tmp_path), dask_address=cluster.scheduler_address,
                             **TINY)
        finally:
            done.set()
            killer.join(10)
    assert killed, "no worker was caught holding a shard"
    assert_same_artifact(load_artifact(path), single_process)


def test_a_killed_flow_started_again_reuses_finished_shards(single_process, quick_pair, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    env = {**os.environ, "PREFECT_API_URL": str(settings.api.url),  # the test server: no server start-up
           "PREFECT_LOCAL_STORAGE_PATH": str(settings.results.local_storage_path)}
    args = ["--preset", "quick", "--output-dir", str(tmp_path)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.calibrate", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = lambda: list((tmp_path / ".work").glob("attn-*-*-*-*-*.safetensors"))  # noqa: E731
    try:
        deadline = time.monotonic() + 300
        while len(shards()) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the flow finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = len(shards())
    assert 3 <= finished < 12 and not (tmp_path / "quick").exists()

    path = calibrate(preset="quick", output_dir=str(tmp_path), **TINY)
    with get_client(sync_client=True) as client:  # the shard tasks of the newest collection subflow
        sub = max(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["collect-attention"]))),
                  key=lambda r: r.created)
        runs = [r for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sub.id])))
                if r.name.startswith("attention-")]
    cached = [r for r in runs if r.state.name == "Cached"]
    assert len(cached) >= finished - 1, [(r.name, r.state.name) for r in runs]  # the one being written may be lost
    assert len(runs) == 12
    assert_same_artifact(load_artifact(path), single_process)


def test_evaluation_on_two_local_workers_equals_one_process(calibrated_quick, tmp_path):
    import json

    from pipelines.evaluate import evaluate

    kw = dict(artifact=calibrated_quick, quick=True, text_tokens=256, num_texts=2)
    one = json.loads(Path(evaluate(**kw, output_dir=str(tmp_path / "one"))).read_text())
    two = json.loads(Path(evaluate(**kw, output_dir=str(tmp_path / "two"), workers=2)).read_text())
    assert one["methods"].keys() == two["methods"].keys() and len(one["methods"]) >= 3
    for name, row in one["methods"].items():
        assert two["methods"][name]["perplexity"] == pytest.approx(row["perplexity"], rel=1e-5), name
        assert two["methods"][name]["kv_reduction_all_layers"] == pytest.approx(row["kv_reduction_all_layers"],
                                                                                 abs=1e-9), name
