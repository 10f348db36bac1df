"""Execute the notebooks in place (refreshes the committed outputs): ``.venv/bin/python notebooks/execute.py``."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

here = Path(__file__).resolve().parent
for path in sorted(here.glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(here)}}).execute()
    nbformat.write(nb, path)
    print("executed", path)
