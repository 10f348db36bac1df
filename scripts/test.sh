#!/usr/bin/env bash
# The test command: set up (idempotent), then run the whole suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# One pytest-xdist worker per core (SPECATTN_TEST_WORKERS overrides; 0 runs in this process), a test file per
# worker at a time so module fixtures (models, calibrations) are built once; tests/conftest.py splits the threads.
exec .venv/bin/python -m pytest -q -n "${SPECATTN_TEST_WORKERS:-auto}" --dist loadfile "$@"
