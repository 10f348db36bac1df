#!/usr/bin/env bash
# The main job: set up, then calibrate the default (quick) model pair end to end and write
# artifacts/quick/<timestamp>-<hash>.safetensors (+ latest.safetensors). Extra arguments go to the flow,
# e.g. scripts/calibrate.sh --preset qwen-coder  or  --num-windows 4.
set -euo pipefail
cd "$(dirname "$0")/.."
preset=quick
for ((i = 1; i <= $#; i++)); do [ "${!i}" = "--preset" ] && { j=$((i + 1)); preset=${!j}; }; done
SPECATTN_PAIR=$preset bash scripts/setup.sh
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}
exec .venv/bin/python -m pipelines.calibrate "$@"
