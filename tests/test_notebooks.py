"""The notebooks run top to bottom, offline, from notebooks/ as Jupyter starts them, and are linked in order."""

import importlib
import json
import os
import re

import nbformat
import pytest
from conftest import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
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


def execute(notebook, timeout: int = 600) -> None:
    """Run every cell as Jupyter does, from notebooks/; a failing cell raises CellExecutionError with its traceback."""
    from nbclient import NotebookClient

    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path):
    notebook = nbformat.read(path, as_version=4)
    execute(notebook)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs), \
        "every notebook shows at least one plot"


@pytest.mark.slow
def test_quickstart_trains_and_chats_with_the_real_model_when_switched(real_model):
    notebook = nbformat.read(NOTEBOOK_DIR / "01_quickstart.ipynb", as_version=4)
    switch = [cell for cell in notebook.cells if "REAL_MODEL = False" in cell.source]
    assert len(switch) == 1  # one variable is the whole switch
    switch[0].source = switch[0].source.replace("REAL_MODEL = False", "REAL_MODEL = True")
    # half the notebook's 8 real-model steps, still with logged and evaluated steps to plot: the switch and the cells
    # are what is tested here (tests/test_real_model.py tests what the real model learns)
    fewer_steps = ["--max_steps", "4", "--logging_steps", "2", "--eval_steps", "2", "--save_steps", "4"]
    switch[0].source += f"\nOVERRIDES += {fewer_steps!r}\n"
    # offline: the fixture has built the model, the notebook finds it in the cache. Training a real model takes
    # minutes per cell on a busy 2-core machine
    execute(notebook, timeout=1800)
    card = json.loads((REPO_ROOT / "outputs" / "nb01-medical-real" / "run_card.json").read_text())
    assert card["base_model"] == str(real_model) and card["config"]["model"]["load_in_4bit"] is False
    chat = notebook.cells[-2]
    assert "recipes/chat.py" in chat.source
    printed = "".join(o.get("text", "") for o in chat.outputs if o.output_type == "stream" and o.name == "stdout")
    answer = printed.split("\n", 1)[1]  # after the echoed command
    print("real-model answer in the quickstart:", answer.strip())
    assert len(re.findall(r"[A-Za-z]{3,}", answer)) >= 3, printed


def test_the_helper_keeps_the_kernel_online_and_runs_only_the_demo_offline(monkeypatch):
    from lora_recipes import notebook

    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    importlib.reload(notebook)  # what the notebooks' first cell does to a fresh kernel
    assert not [name for name in OFFLINE_VARS if name in os.environ]
    demo, real = notebook.script_env(offline=True), notebook.script_env(offline=False)
    assert [demo.get(name) for name in OFFLINE_VARS] == ["1", "1"]
    assert not [name for name in OFFLINE_VARS if name in real]


@pytest.mark.parametrize(("config", "offline"), [("recipes/configs/medical_smoke.yaml", True),
                                                 ("recipes/configs/medical.yaml", False)])
def test_quickstart_switch_runs_the_real_config_with_the_hub(config, offline):
    """The switch cell and the training and chat cells, with `run` recording how it was called."""
    notebook = nbformat.read(NOTEBOOK_DIR / "01_quickstart.ipynb", as_version=4)
    (switch,) = [cell.source for cell in notebook.cells if "REAL_MODEL = False" in cell.source]
    assert 'CONFIG = "recipes/configs/medical_smoke.yaml"' in switch
    calls = []
    namespace = {"REPO": REPO_ROOT, "real_model_overrides": list,
                 "run": lambda script, *args, **kwargs: calls.append((script, kwargs.get("offline", True)))}
    exec(switch.replace("recipes/configs/medical_smoke.yaml", config), namespace)
    for cell in notebook.cells:
        if cell.cell_type == "code" and cell.source.startswith(("log = run(", 'run("recipes/chat.py"')):
            exec(cell.source, namespace)
    assert calls == [("recipes/sft_medical.py", offline), ("recipes/chat.py", offline)]
