"""notebooks/flexicache_quickstart.ipynb runs top to bottom, headless, in a kernel of this interpreter (nbclient);
it is stored without outputs, so what a reader opens is never stale."""

import json
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "flexicache_quickstart.ipynb"


@pytest.fixture(scope="module")
def notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_the_notebook_is_stored_without_outputs(notebook):
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.fixture
def this_python_kernel(tmp_path, monkeypatch):
    """A kernel spec running this very interpreter (not whatever 'python3' a user's Jupyter finds first)."""
    spec = tmp_path / "kernels" / "flexicache-test"
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "flexicache-hf tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))  # searched before the user's and the system's folders
    return "flexicache-test"


def test_the_notebook_runs_top_to_bottom(notebook, this_python_kernel, tmp_path):
    client = nbclient.NotebookClient(notebook, kernel_name=this_python_kernel, timeout=600,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # a failing cell raises CellExecutionError, with the cell and its traceback
    seconds = time.perf_counter() - start
    nbformat.write(notebook, tmp_path / "executed.ipynb")  # for a look when debugging (pytest keeps tmp_path)

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 3  # memory, page selection, head stability: each shown once
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| dense sdpa (DynamicCache) |" in text and "FlexiCache, 256-token budget" in text
    assert "flexicache_sketch2mass" in text  # the accuracy table
    import torch

    if not torch.cuda.is_available():
        assert "the GPU section is skipped" in text
    print(f"notebook executed in {seconds:.0f} s")
