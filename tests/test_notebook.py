"""Notebooks: live progress widgets and ``RunDetails``, run in a real Jupyter
kernel (ipykernel, driven by nbclient) with this venv's Python."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest

from .helpers import REPO, cell_text, execute_notebook, readme_notebook_cell

# in the test extra (scripts/install): a missing one fails, it is not skipped

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _widgets(nb: Any) -> dict[str, dict[str, Any]]:
    """The final state of every widget, by model id (as nbclient kept it)."""
    return nb.metadata["widgets"][WIDGET_STATE]["state"]  # type: ignore[no-any-return]


def _shown(cell: Any) -> list[str]:
    """The model ids of the widgets a cell displayed."""
    return [
        o.data["application/vnd.jupyter.widget-view+json"]["model_id"]
        for o in cell.outputs
        if o.output_type == "display_data"
        and "application/vnd.jupyter.widget-view+json" in o.data
    ]


def _table(html: str) -> list[list[str]]:
    rows = re.findall(r"<tr>(.*?)</tr>", html)
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in rows]


def _progress_bars(nb: Any, cell: Any) -> list[tuple[float, float, str]]:
    """``(value, max, right-hand text)`` of each tqdm widget the cell showed."""
    state = _widgets(nb)
    bars = []
    for model_id in _shown(cell):
        box = state[model_id]["state"]
        if state[model_id]["model_name"] != "HBoxModel":
            continue
        parts = [state[c.removeprefix("IPY_MODEL_")] for c in box["children"]]
        progress = next(
            p["state"] for p in parts if p["model_name"] == "FloatProgressModel"
        )
        right = parts[-1]["state"]["value"].replace("\u2007", " ")  # figure spaces
        bars.append((progress["value"], progress["max"], right))
    return bars


@pytest.mark.slow
def test_quickstart_notebook_shows_live_progress_and_run_details(
    tmp_path: Path, kernel: str
) -> None:
    nb = nbformat.read(REPO / "examples" / "notebook" / "quickstart.ipynb", 4)
    execute_notebook(nb, tmp_path, kernel)
    code = [c for c in nb.cells if c.cell_type == "code"]
    step_cell, details_cell, pipeline_cell, summary_cell = code[1:]

    # step.run(show_output=True): a tqdm widget that ended full, then returned
    assert "Completed 40 0" in cell_text(step_cell)
    bars = _progress_bars(nb, step_cell)
    assert len(bars) == 1, step_cell.outputs
    value, maximum, right = bars[0]
    assert value == maximum == 10
    assert "items ok=40 failed=0" in right and "items/s" in right

    # RunDetails of a finished step run
    (table_id,) = _shown(details_cell)
    rows = _table(_widgets(nb)[table_id]["state"]["value"])
    assert rows[0][:2] == ["Step", "Status"]
    assert rows[1][:5] == ["score-images", "Completed", "10/10", "40", "0"]

    # the pipeline: a progress widget per step, and the live table's last view
    assert "Completed" in cell_text(pipeline_cell)
    bars = _progress_bars(nb, pipeline_cell)
    assert [(v, m) for v, m, _ in bars] == [(10, 10), (1, 1)], pipeline_cell.outputs
    table_id = _shown(pipeline_cell)[0]
    html = _widgets(nb)[table_id]["state"]["value"]
    assert ": Completed" in html
    assert [row[:5] for row in _table(html)[1:]] == [
        ["score", "Completed", "10/10", "40", "0"],
        ["summarize", "Completed", "1/1", "1", "0"],
    ]
    # 0 + 1 + ... + 39 characters, read back through PipelineData
    assert "40 scores, total 780" in cell_text(summary_cell)


@pytest.mark.slow
def test_readme_notebook_cell_runs_as_written(tmp_path: Path, kernel: str) -> None:
    (tmp_path / "score.py").write_text(
        "import os\n\n"
        "def init():\n    pass\n\n"
        "def run(mini_batch):\n"
        "    return [os.path.basename(p) for p in mini_batch]\n"
    )
    (tmp_path / "images").mkdir()
    for i in range(25):
        (tmp_path / "images" / f"img{i:02}.png").write_bytes(b"\x89PNG")
    cell = readme_notebook_cell()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    execute_notebook(nb, tmp_path, kernel)
    (ran,) = nb.cells
    bars = _progress_bars(nb, ran)
    assert [(v, m) for v, m, _ in bars] == [(3, 3)], ran.outputs
    tables = [
        _table(_widgets(nb)[i]["state"]["value"])
        for i in _shown(ran)
        if _widgets(nb)[i]["model_name"] == "HTMLModel"
    ]
    assert tables and tables[-1][1][:5] == [
        "score-images", "Completed", "3/3", "25", "0"
    ]  # fmt: skip
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert len(lines) == 25
