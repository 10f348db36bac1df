"""Both notebooks run top to bottom on a real (small) calibration and evaluation, and draw their figures."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name,figures", [("alignment.ipynb", 2), ("quality.ipynb", 2)])
def test_notebook_executes(name, figures, calibrated_quick, quick_evaluation, monkeypatch):
    monkeypatch.setenv("SPECATTN_ARTIFACT", calibrated_quick)
    monkeypatch.setenv("SPECATTN_EVALUATION", quick_evaluation)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)  # executed in memory: the committed outputs stay
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == figures
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
