"""The Colab notebooks in ``examples/notebooks/``: stored without outputs, opening with a Colab badge, and the CPU
ones executed end to end (with a short run injected after their ``parameters`` cell, as papermill does)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "examples" / "notebooks"
#: the GitHub repository the badges and install lines point at. Its owner is a placeholder until the project is
#: published (see the README's "Demos" section): every notebook, the Space and the README must agree with it.
REPOSITORY = "trl-visual/trl_visual"
ALL = ["quickstart.ipynb", "bpgo_vipo.ipynb", "real_models.ipynb"]
#: notebooks CI runs (CPU), with the plots each must show: (name, images at least)
EXECUTED = [("quickstart.ipynb", 4), ("bpgo_vipo.ipynb", 4)]
SHORT_RUN = "SETTINGS.update(max_steps=2, per_device_train_batch_size=8)\n"


def load(name: str) -> dict:
    return json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.mark.parametrize("name", ALL)
def test_stored_without_outputs(name):
    """Outputs, execution counts and widget state stay out of git (run the notebook, then clear it)."""
    notebook = load(name)
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], (
                f"{name}, cell {i}: outputs are stored; clear them before committing (Jupyter: Edit → Clear "
                "Outputs of All Cells, or `jupyter nbconvert --clear-output --inplace`)"
            )
            assert cell["execution_count"] is None, f"{name}, cell {i}: an execution count is stored"
    assert "widgets" not in notebook["metadata"], f"{name}: widget state is stored"


@pytest.mark.parametrize("name", ALL)
def test_opens_with_a_colab_badge_for_its_own_path(name):
    first = source(load(name)["cells"][0])
    url = f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/examples/notebooks/{name}"
    assert f"(https://colab.research.google.com/assets/colab-badge.svg)]({url})" in first


@pytest.mark.parametrize("name", ALL)
def test_installs_from_the_same_repository(name):
    """The install cell, and every other GitHub link, point at :data:`REPOSITORY`."""
    text = "\n".join(source(cell) for cell in load(name)["cells"])
    assert f"git+https://github.com/{REPOSITORY}" in text
    assert set(re.findall(r"github(?:\.com)?/([\w.-]+/[\w.-]+)", text)) == {REPOSITORY}


def test_space_and_readme_use_the_same_repository():
    root = NOTEBOOKS.parents[1]
    requirements = (root / "spaces" / "trl-visual-demo" / "requirements.txt").read_text()
    assert f"git+https://github.com/{REPOSITORY}" in requirements
    readme = (root / "README.md").read_text()
    for name in ALL:
        assert f"colab.research.google.com/github/{REPOSITORY}/blob/main/examples/notebooks/{name}" in readme


def test_real_models_notebook_is_valid_python():
    """Not executed here (it needs a GPU and the Hub): each code cell at least parses, IPython magics aside."""
    notebook = load("real_models.ipynb")
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            lines = [line for line in source(cell).splitlines() if not line.lstrip().startswith(("%", "!"))]
            try:
                ast.parse("\n".join(lines))
            except SyntaxError as error:
                pytest.fail(f"real_models.ipynb, cell {i}: {error}")


def with_short_run(notebook):
    """The notebook with a cell setting a short run inserted after its ``parameters`` cell."""
    import nbformat

    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "a CPU notebook needs exactly one cell tagged 'parameters'"
    injected = nbformat.v4.new_code_cell(SHORT_RUN, metadata={"tags": ["injected-parameters"]})
    injected["id"] = "injected-parameters"
    notebook.cells.insert(tagged[0] + 1, injected)
    return notebook


@pytest.mark.parametrize("name, min_images", EXECUTED)
def test_cpu_notebook_runs(name, min_images, tmp_path):
    """Every cell runs without error (a failing cell fails the test with its traceback), and the plots show."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = with_short_run(nbformat.read(NOTEBOOKS / name, as_version=4))
    client = nbclient.NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= min_images, f"{name} showed {len(images)} images, expected at least {min_images}"
