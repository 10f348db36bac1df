"""The runtime must stay lean: no Prefect, datasets, scipy or pipelines, statically and at import time."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"prefect", "datasets", "scipy", "pipelines"}
RUNTIME = Path(__file__).resolve().parents[1] / "specattn_runtime"


def test_no_forbidden_imports_in_source():
    offenders = []
    for path in RUNTIME.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_importing_the_runtime_pulls_in_none_of_them():
    code = ("import sys, specattn_runtime, specattn_runtime.artifact, specattn_runtime.selection, "
            "specattn_runtime.capture, specattn_runtime.models, specattn_runtime.fingerprint; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
