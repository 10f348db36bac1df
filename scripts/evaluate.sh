#!/usr/bin/env bash
# Quality evaluation: set up, then run the evaluate flow on an artifact (default: the quick pair's latest, which
# scripts/calibrate.sh writes) over Jane Austen's novels; writes evaluation.json, table.md and tradeoff.png beside
# it. Extra arguments go to the flow, e.g. --quick, --num-texts 6, --artifact PATH --preset qwen-coder.
exec bash "$(dirname "$0")/flow.sh" pipelines.evaluate "$@"
