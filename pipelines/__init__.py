"""SpecAttn calibration pipelines (Prefect flows). Imports :mod:`specattn_runtime`, never the reverse."""
