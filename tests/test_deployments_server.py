"""End to end as a user runs it: a real `prefect server start` (SQLite, temp home, random port), the serve process
of pipelines.deployments, and `prefect deployment run calibrate/default` from the CLI."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from specattn_runtime.artifact import load_artifact

pytestmark = pytest.mark.slow
# the smallest calibration that still writes an artifact (sparse drafting's tuning has its own tests)
TINY = {"window_tokens": 128, "num_windows": 2, "holdout_windows": 1, "queries_per_window": 8, "sparse_draft": False}
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if result := check():
                return result
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} not reached in {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
           "PREFECT_UI_ENABLED": "false"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200,
                   180, "prefect server health", server)
        yield env
    finally:
        stop(server)
        log.close()


def prefect_cli(env, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


_COUNT_SCHEDULED = """
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
with get_client(sync_client=True) as c:
    runs = c.read_flow_runs(deployment_filter=DeploymentFilter(
        name=DeploymentFilterName(any_=["scheduled-recalibration"])))
    print(sum(r.auto_scheduled for r in runs))
"""


def scheduled_runs(env) -> int:
    res = subprocess.run([sys.executable, "-c", _COUNT_SCHEDULED], env=env, capture_output=True, text=True,
                         timeout=60)
    return int(res.stdout.strip() or 0)


def test_deployment_run_produces_an_artifact(prefect_server, quick_pair, tmp_path):
    env = prefect_server
    out = tmp_path / "artifacts"
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "pipelines.deployments", "--output-dir", str(out),
                              "--cron", "* * * * *"], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    try:
        wait_until(lambda: prefect_cli(env, "deployment", "inspect", "calibrate/default").returncode == 0,
                   120, "deployment calibrate/default registered", serve)
        run = prefect_cli(env, "deployment", "run", "calibrate/default", "--params", json.dumps(TINY),
                          "--watch", "--watch-timeout", "400", timeout=450)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Completed" in run.stdout, run.stdout
        art = load_artifact(out / "quick" / "latest.safetensors")
        assert art.n_target_layers == 30

        # The scheduled deployment exists with its cron, and the server's scheduler creates runs for it
        # (this is what breaks with sqlalchemy 2.1, hence the pin).
        inspect = prefect_cli(env, "deployment", "inspect", "calibrate/scheduled-recalibration")
        assert inspect.returncode == 0 and "* * * * *" in inspect.stdout, inspect.stdout
        wait_until(lambda: scheduled_runs(env) > 0, 120, "a run created by the scheduler")
    finally:
        stop(serve)  # the worker goes before the server (fixture teardown)
        log.close()


def test_work_pool_deployments_from_prefect_yaml(prefect_server, quick_pair, tmp_path):
    """The production route: `prefect deploy --all` (prefect.yaml), a process worker, a deployment run."""
    env = {**prefect_server, "PWD": str(ROOT)}
    created = prefect_cli(env, "work-pool", "create", "specattn", "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "specattn"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    try:
        out = tmp_path / "artifacts"
        run = prefect_cli(env, "deployment", "run", "calibrate/default",
                          "--params", json.dumps({**TINY, "output_dir": str(out)}),
                          "--watch", "--watch-timeout", "400", timeout=450)
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout + run.stderr
        assert load_artifact(out / "quick" / "latest.safetensors").n_target_layers == 30
        inspect = prefect_cli(env, "deployment", "inspect", "calibrate/scheduled-recalibration")
        assert inspect.returncode == 0 and "0 3 * * 0" in inspect.stdout, inspect.stdout
        wait_until(lambda: scheduled_runs(env) > 0, 120, "a run created by the scheduler")
    finally:
        stop(worker)
        log.close()
