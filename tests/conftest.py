"""Shared fixtures. Tests use the real shipped models (fetched by scripts/setup.sh) and real Prefect servers."""

from __future__ import annotations

import os
import tempfile

# Prefect reads its settings when first imported: keep tests off the user's ~/.prefect, give the temporary
# server time to start on 2 cores (a fresh SQLite database takes ~45 s there), and send no analytics.
_PREFECT_HOME = tempfile.mkdtemp(prefix="specattn-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Without a GPU, Triton kernels run in its interpreter (must be set before triton is imported).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist the workers share the machine's cores: each takes its share of threads, since OpenMP threads
# that outnumber the cores spin against each other (a 2-core machine with 2 workers: one thread each).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def quick_pair() -> tuple[str, str]:
    """(draft_dir, target_dir) of the shipped quick pair: SmolLM2-135M and its 10-layer early exit."""
    from pipelines.presets import PAIRS

    d, t = PAIRS["quick"].ensure()
    return str(d), str(t)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded generator per test: inputs differ between tests, runs are reproducible."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.fixture(scope="session")
def calibrated_quick(prefect_harness, quick_pair, tmp_path_factory) -> str:
    """A real (small) calibration of the quick pair: the artifact path. Shared by evaluation and notebook tests."""
    from pipelines.calibrate import calibrate

    out = tmp_path_factory.mktemp("calibrated")
    return calibrate(preset="quick", output_dir=str(out), window_tokens=256, num_windows=2, holdout_windows=1,
                     queries_per_window=16)


@pytest.fixture(scope="session")
def quick_evaluation(calibrated_quick, tmp_path_factory) -> str:
    """``evaluate --quick`` on that artifact: the evaluation JSON path."""
    from pipelines.evaluate import evaluate

    out = tmp_path_factory.mktemp("evaluation")
    return evaluate(artifact=calibrated_quick, text_tokens=256, num_texts=2, quick=True, output_dir=str(out))
