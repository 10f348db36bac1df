"""Deployments of the ``calibrate`` flow, served by one long-running process.

- ``calibrate/default``: on demand (``prefect deployment run calibrate/default``), the quick pair by default.
- ``calibrate/scheduled-recalibration``: on a cron schedule (default weekly, Sunday 03:00 UTC); finishes early
  when models, corpus and parameters are unchanged since ``latest``, otherwise writes a new versioned artifact.
- ``evaluate/default``: the quality evaluation of ``<output_dir>/<preset>/latest.safetensors`` on demand.

``python -m pipelines.deployments [--cron "..."] [--output-dir DIR]`` registers both with the Prefect server
named by ``PREFECT_API_URL`` and executes their runs until stopped (Ctrl-C). Schedules fire only against a real
``prefect server start``, not the temporary server a bare flow call starts.
"""

from __future__ import annotations

import argparse
import os

from prefect import serve

from .calibrate import calibrate
from .evaluate import evaluate

DEFAULT_CRON = "0 3 * * 0"


def build_deployments(output_dir: str, cron: str = DEFAULT_CRON, preset: str = "quick"):
    common = {"preset": preset, "output_dir": output_dir}
    return [
        calibrate.to_deployment(name="default", parameters=common,
                                description="Calibrate on demand; parameters override the flow defaults."),
        calibrate.to_deployment(name="scheduled-recalibration", cron=cron,
                                parameters={**common, "skip_if_unchanged": True},
                                description="Recalibrate on a schedule; skips when nothing changed."),
        evaluate.to_deployment(name="default", parameters={
            "preset": preset, "artifact": os.path.join(output_dir, preset, "latest.safetensors")},
            description="Quality table, JSON and trade-off plot for the latest artifact."),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipelines.deployments", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cron", default=DEFAULT_CRON, help=f"recalibration schedule (default {DEFAULT_CRON!r})")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--output-dir", default=os.path.abspath(os.environ.get("SPECATTN_ARTIFACTS", "artifacts")),
                    help="where artifacts land (absolute, since the serving process may run elsewhere)")
    args = ap.parse_args(argv)
    serve(*build_deployments(args.output_dir, args.cron, args.preset))


if __name__ == "__main__":
    main()
