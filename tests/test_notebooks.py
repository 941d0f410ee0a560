"""Every notebook executes in smoke mode (K2JAX_SMOKE=1), all five at once in kernel processes."""

import os
import pathlib
import subprocess
import sys

import pytest
from conftest import xla_flags

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
RUNNER = """
import sys, nbclient, nbformat
book = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(book, timeout=400, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[2]}}).execute()
"""


@pytest.fixture(scope="module")
def runs():
  """Starts every notebook at once; {name: Popen}."""
  env = {**os.environ, "XLA_FLAGS": xla_flags(None)}
  env.update(K2JAX_SMOKE="1", MPLBACKEND="Agg", PYTHONPATH=str(NOTEBOOKS[0].parents[1]))
  procs = {nb.name: subprocess.Popen([sys.executable, "-c", RUNNER, str(nb), str(nb.parent)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True) for nb in NOTEBOOKS}
  yield procs
  for p in procs.values():
    if p.poll() is None:
      p.kill()


def test_there_are_five_notebooks_stored_without_outputs():
  import nbformat

  assert [nb.stem[:2] for nb in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
  for nb in NOTEBOOKS:
    book = nbformat.read(nb, as_version=4)
    assert "find_spec(\"k2jax\")" in book.cells[1].source, f"{nb.name}: no install cell"
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), nb.name


@pytest.mark.slow
@pytest.mark.parametrize("name", [nb.name for nb in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(runs, name):
  out, _ = runs[name].communicate(timeout=600)
  assert runs[name].returncode == 0, f"{name} failed:\n{out[-4000:]}"
