"""The notebooks run top to bottom, offline, from notebooks/ as Jupyter starts them, and are linked in order."""

import nbformat
import pytest
from conftest import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_data_preparation.ipynb", "03_new_domain.ipynb",
            "04_evaluate_merge_deploy.ipynb"]


def test_the_four_notebooks_exist_and_the_readme_links_them_in_order():
    assert [p.name for p in NOTEBOOKS] == EXPECTED
    readme = (REPO_ROOT / "README.md").read_text()
    positions = [readme.find(f"(notebooks/{name})") for name in EXPECTED]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), positions


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    # A failing cell raises CellExecutionError, which fails the test with the cell's traceback.
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs), \
        "every notebook shows at least one plot"
