"""Four notebooks written as Azure ML's four ParallelRunStep samples are
(file inference, tabular inference, partition per column, partition per
folder), run in a real Jupyter kernel with ``install_as_azureml()`` as
their only daskrun line (issue 27); their outputs checked against pandas
and plain loops.

Each runs in a copy of ``examples/aml-notebooks`` with no workspace config
above it, as on a new machine: ``Workspace.from_config()`` opens the
default local workspace (here under the test's folder).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import pytest

from .helpers import REPO, cell_text, execute_notebook, require_module

NOTEBOOKS = REPO / "examples" / "aml-notebooks"
# what prints a cell's variable for the test (added to the copy it runs)
SHOW = 'print("RESULT " + {}.to_json(orient="split", double_precision=15))'


def _run(
    name: str,
    tmp_path: Path,
    kernel: str,
    monkeypatch: pytest.MonkeyPatch,
    show: str,
) -> tuple[Any, pd.DataFrame]:
    """Run notebook ``name`` in a copy of its folder; the notebook, and the
    DataFrame ``show`` held at its end."""
    folder = tmp_path / "work"
    shutil.copytree(NOTEBOOKS, folder)
    # the default workspace under the test's folder (the kernel inherits it)
    monkeypatch.setenv("DASK_DASKRUN__DEFAULT_WORKSPACE", str(tmp_path / "ws"))
    nb = nbformat.read(folder / name, 4)
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert re.findall(r".*daskrun.*", sources) == [
        "import daskrun; daskrun.install_as_azureml()"
    ]
    nb.cells.append(nbformat.v4.new_code_cell(SHOW.format(show)))
    execute_notebook(nb, folder, kernel)
    line = next(
        x for x in cell_text(nb.cells[-1]).splitlines() if x.startswith("RESULT ")
    )
    frame = pd.read_json(
        io.StringIO(line.removeprefix("RESULT ")), orient="split", precise_float=True
    )
    return nb, frame


def _printed(nb: Any) -> str:
    """Everything the notebook's cells printed (stdout and stderr)."""
    return "".join(cell_text(c) for c in nb.cells if c.cell_type == "code")


def _common(nb: Any, tmp_path: Path) -> None:
    """What every sample prints first: the workspace, found without a
    config, and Azure ML's facts about it."""
    printed = _printed(nb)
    assert (
        "daskrun: no workspace config in" in printed
        and f"created the default local workspace {str(tmp_path / 'ws')!r}" in printed
    )
    assert "Azure region: local\nSubscription id: local\nResource group: local" in (
        printed
    )
    # a run's native output (TensorFlow's C++ lines, say) is in its logs
    assert "oneDNN" not in printed.split("RESULT ")[-1]


@pytest.mark.slow
def test_file_inference_notebook(
    tmp_path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tf = require_module("tensorflow", "pip install -e '.[examples]'")
    nb, frame = _run(
        "file-dataset-image-inference-mnist.ipynb", tmp_path, kernel, monkeypatch, "df"
    )
    _common(nb, tmp_path)
    # a plain loop with the model the notebook trained: each image's digit
    import numpy as np
    from PIL import Image

    folder = tmp_path / "work"
    model = tf.keras.models.load_model(folder / "models" / "mnist.keras")
    names = sorted(os.listdir(folder / "mnist_images"))
    expected = [
        [name, int(np.argmax(model(np.array(Image.open(folder / "mnist_images" / name))
                                   .reshape((1, 28, 28)), training=False)))]
        for name in names
    ]  # fmt: skip
    assert frame.values.tolist() == expected
    # the images are scikit-learn's first 60 digits: the model knows most
    from sklearn.datasets import load_digits

    target = load_digits().target
    right = sum(target[int(name.split(".")[0])] == digit for name, digit in expected)
    assert right >= 0.8 * len(expected)

    # the pins of the cloud image are warned about in one line, and it runs
    wait = next(c for c in nb.cells if "pipeline_run.wait_for" in c.source)
    lines = cell_text(wait).splitlines()
    (pins,) = [x for x in lines if "tensorflow==2.13.0" in x]
    assert pins.startswith("daskrun: Environment 'batch_environment': ")
    assert "protobuf==4.23.3 not met" in pins and "tensorflow-cpu" in pins
    # no TensorFlow C++ line of any worker reaches the notebook: only the
    # cell that trains the model (in the kernel itself) may show some
    train = next(i for i, c in enumerate(nb.cells) if "net.fit(" in c.source)
    others = "".join(
        cell_text(c)
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and i != train
    )
    for noise in ("oneDNN", "absl::", "cpu_feature_guard", "I0000 "):
        assert noise not in others, noise
    # they are in the runs' logs, each worker's with what its script printed
    logs = "".join(
        p.read_text() for p in (tmp_path / "ws" / "runs").rglob("user/stdout/*.txt")
    )
    assert "oneDNN" in logs and "run method start" in logs
    # the second run: one image, one mini-batch
    second = next(
        i for i, c in enumerate(nb.cells) if "pipeline_run_2.wait" in c.source
    )
    assert "Completed" in cell_text(nb.cells[second])


@pytest.mark.slow
def test_tabular_inference_notebook(
    tmp_path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    require_module("sklearn", "pip install -e '.[examples]'")
    nb, frame = _run(
        "tabular-dataset-inference-iris.ipynb", tmp_path, kernel, monkeypatch, "df"
    )
    _common(nb, tmp_path)
    folder = tmp_path / "work"
    rows = pd.read_csv(folder / "iris" / "iris.csv")
    with open(folder / "iris_model.pkl" / "iris_model.pkl", "rb") as f:
        model = pickle.load(f)
    # pandas: every row once, in order, with the model's variety
    expected = rows.assign(variety=model.predict(rows))
    pd.testing.assert_frame_equal(frame, expected)
    printed = _printed(nb)
    (pins,) = [x for x in printed.splitlines() if "pandas==1.4.4" in x]
    assert "numpy==1.19.5 not met" in pins and "scikit-learn==0.22.2 not met" in pins
    assert "azureml" not in pins  # daskrun's to provide


@pytest.mark.slow
def test_partition_per_column_notebook(
    tmp_path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb, frame = _run(
        "tabular-dataset-partition-per-column.ipynb", tmp_path, kernel, monkeypatch,
        "df",
    )  # fmt: skip
    _common(nb, tmp_path)
    oj = pd.read_csv(tmp_path / "work" / "oj.csv")
    assert len(frame) == len(oj)
    # pandas: each store's and brand's total income, on each of its rows
    totals = oj.groupby(["Store", "Brand"])["INCOME"].sum()
    got = frame.groupby(["Store", "Brand"])["total_income"]
    assert got.nunique().eq(1).all()
    pd.testing.assert_series_equal(
        got.first(), totals, check_names=False, check_exact=False, rtol=1e-9
    )
    # the rows themselves, partition by partition in key order
    columns = [c for c in oj.columns if c not in ("Store", "Brand")]
    ordered = oj.sort_values(
        ["Store", "Brand"], kind="stable", key=lambda c: c.astype(str)
    )
    assert frame[columns].astype(str).values.tolist() == (
        ordered[columns].astype(str).values.tolist()
    )
    # partition_by: one progress bar, not a line per partition (249)
    cell = next(c for c in nb.cells if "partition_by(" in c.source)
    assert "249" not in cell_text(cell)
    bars = [
        o for o in cell.outputs
        if o.output_type == "display_data"
        and "application/vnd.jupyter.widget-view+json" in o.data
    ]  # fmt: skip
    assert len(bars) == 1, cell.outputs


@pytest.mark.slow
def test_partition_per_folder_notebook(
    tmp_path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb, frame = _run(
        "file-dataset-partition-per-folder.ipynb", tmp_path, kernel, monkeypatch, "df"
    )
    _common(nb, tmp_path)
    # a plain loop over the sample's layout: user, season, genre
    files = tmp_path / "work" / "test_files"
    layout = [
        ("user1", "disco"), ("user1", "orchestra"), ("user2", "piano"),
        ("user3", "spirituality"), ("user4", "piano"), ("user4", "piano"),
    ]  # fmt: skip
    expected = []
    for user, genre in sorted(set(layout)):
        size = (files / genre / f"{genre}.wav").stat().st_size
        n = layout.count((user, genre))
        expected += [[f"{genre}.wav", size, 1 / n, user, genre, size * n]] * n
    assert frame.values.tolist() == expected
    keys = next(
        c for c in nb.cells if c.source == "partitioned_file_dataset.partition_keys"
    )
    assert json.loads(keys.outputs[0].data["text/plain"].replace("'", '"')) == [
        "user", "season", "genres",
    ]  # fmt: skip
