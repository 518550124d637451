"""The Pyro integration notebook executes (nbclient, the venv's ``python3`` kernel)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "pyro_integration.ipynb"
TIME_LIMIT_S = 60  # the notebook must stay short enough for CI


@pytest.mark.slow
def test_pyro_integration_notebook_executes(monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "store the notebook without outputs"
    )
    # The kernel inherits the environment: one thread is fastest for these tiny models, and keeps
    # the run from stalling on a busy two-core runner.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # CI exports MPLBACKEND=Agg, under which plt.show() records no image: use the inline backend.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=TIME_LIMIT_S,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    start = time.perf_counter()
    client.execute()
    assert time.perf_counter() - start < TIME_LIMIT_S
    figures = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert figures, "the notebook should draw the predictive-uncertainty figure"
