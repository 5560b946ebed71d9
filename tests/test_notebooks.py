"""Every notebook in notebooks/ runs headless from top to bottom without an error (nbclient + ipykernel),
and is stored without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_are_there():
    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_quickstart", "02_emergence", "03_conditional_decoding", "04_heads_and_circuits",
                     "05_real_language_model"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_is_stored_stripped(path: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: small models, a shared 2-core machine
    nb = nbformat.read(path, as_version=4)
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} is stored with outputs: strip them (jupyter nbconvert --clear-output)"
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                            allow_errors=False)
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # the views rendered to HTML in the notebook (the libraries inline, never from a CDN)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs if o.output_type in ("display_data", "execute_result"))
    assert "unpkg.com" not in html
