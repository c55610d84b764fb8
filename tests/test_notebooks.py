"""The example notebooks run top to bottom in their small mode, and the repository copies carry no outputs.

Each notebook is executed with nbclient in a fresh kernel started from this interpreter (a kernelspec written to a
temporary ``JUPYTER_PATH``, so a user-level ``python3`` kernelspec pointing at another Python cannot hijack the run),
with ``M2IST_NOTEBOOK_SMALL=1`` (tiny towers, a few steps, no network) and a temporary ``M2IST_CACHE`` shared by the
five notebooks (the tiny shapes ViT is pretrained once). The kernel's working directory is ``examples/``, as when
a user opens the notebook in ``jupyter lab``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
NOTEBOOKS = [
    "01_quickstart.ipynb",
    "02_reproduce_refcoco.ipynb",
    "03_share_and_reuse.ipynb",
    "04_bring_your_own_towers.ipynb",
    "05_compare_methods.ipynb",
]
SMALL_MODE_SWITCH = 'SMALL = os.environ.get("M2IST_NOTEBOOK_SMALL", "0") == "1"'
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def notebook_environment(tmp_path_factory):
    """Environment variables for the kernels: small mode, offline, temporary caches, a kernelspec for this Python."""
    root = tmp_path_factory.mktemp("notebooks")
    kernel_dir = root / "jupyter" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (m2ist tests)", "language": "python"}
    (kernel_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return {
        "M2IST_NOTEBOOK_SMALL": "1",
        "M2IST_CACHE": str(root / "m2ist_cache"),
        "JUPYTER_PATH": str(root / "jupyter"),
        "IPYTHONDIR": str(root / "ipython"),
        "HF_HOME": str(root / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }


def _errors(notebook) -> list[str]:
    found = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"cell {index}: {output.get('ename')}: {output.get('evalue')}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_small_mode(name, notebook_environment, monkeypatch):
    for key, value in notebook_environment.items():
        monkeypatch.setenv(key, value)
    before = sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*"))
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:  # the message holds the cell and its traceback
        pytest.fail(f"{name} failed in small mode:\n{str(error)[-4000:]}")
    assert not _errors(notebook), _errors(notebook)
    executed = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert executed and all(cell.execution_count for cell in executed), "some code cells were not run"
    printed = "".join(output.get("text", "") for cell in executed for output in cell.outputs)
    assert printed, "the notebook printed nothing"
    after = sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*"))
    assert after == before, f"small mode left files in examples/: {sorted(set(after) - set(before))}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_repository_copy_is_clean_and_has_the_small_mode_switch(name):
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    with_outputs = [i for i, cell in enumerate(code_cells) if cell.outputs or cell.execution_count is not None]
    assert not with_outputs, f"{name}: clear the outputs of code cells {with_outputs} before committing"
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"
    switch = [i for i, cell in enumerate(code_cells) if SMALL_MODE_SWITCH in cell.source]
    assert switch and switch[0] <= 1, f"{name}: the small-mode parameter cell must come first (found {switch})"
    assert "parameters" in code_cells[switch[0]].metadata.get("tags", [])


def test_examples_readme_lists_every_notebook():
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for name in NOTEBOOKS:
        assert name in readme, name
    assert "M2IST_NOTEBOOK_SMALL=1" in readme
