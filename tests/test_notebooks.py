"""Every notebook runs top to bottom (nbclient, a real kernel, real clusters)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_there():
    names = [p.stem for p in NOTEBOOKS]
    assert names == [
        "01_quickstart",
        "02_data_sources",
        "03_cifar10_resnet_vgg",
        "04_gpu_dask_cuda",
        "05_dashboard",
        "06_text",
        "07_security",
        "08_model_parallel",
        "09_tuning",
    ]


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    # Committed without outputs, so that diffs stay readable.
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code")
    client = nbclient.NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    code = "\n".join(c.source for c in book.cells if c.cell_type == "code")
    assert "import daskdl" in code
    errors = [
        out
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors
