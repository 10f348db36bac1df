#!/usr/bin/env bash
# Set up (for the model pair named by --preset, default quick), then run one flow module with the remaining
# arguments: scripts/flow.sh pipelines.calibrate --num-windows 4. Used by calibrate.sh and evaluate.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
module=$1
shift
preset=quick
for ((i = 1; i <= $#; i++)); do [ "${!i}" = "--preset" ] && { j=$((i + 1)); preset=${!j}; }; done
SPECATTN_PAIR=$preset bash scripts/setup.sh
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}
exec .venv/bin/python -m "$module" "$@"
