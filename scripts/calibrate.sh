#!/usr/bin/env bash
# The main job: set up, then calibrate the default (quick) model pair end to end and write
# artifacts/quick/<timestamp>-<hash>.safetensors (+ latest.safetensors). Extra arguments go to the flow,
# e.g. scripts/calibrate.sh --preset qwen-coder  or  --num-windows 4.
exec bash "$(dirname "$0")/flow.sh" pipelines.calibrate "$@"
