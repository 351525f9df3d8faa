"""The shipped examples run end to end (smaller sizes than their defaults)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from .helpers import REPO, require_module


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_mnist_demo(tmp_path: Path) -> None:
    require_module("tensorflow", "pip install -e '.[examples]'")
    demo = _run(
        "-m", "daskrun", "demo", "--dir", "demo", "--images", "400", cwd=tmp_path
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = demo.stdout
    assert "all images: prediction has 400 rows" in out
    assert "one image: prediction has 1 rows" in out
    accuracy = float(out.split("accuracy: ")[1].split("%")[0])
    assert accuracy > 90
    outputs = sorted(
        (tmp_path / "demo/workspace/datastore/daskrun").glob(
            "*/inferences/mnist_outputs.txt"
        )
    )
    rows = sorted(len(pd.read_csv(p, delimiter=":", header=None)) for p in outputs)
    assert rows == [1, 400]
    again = _run(
        "-m", "daskrun", "demo", "--dir", "demo", "--images", "400", cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(reused the output of run") == 2


def test_tabular_example(tmp_path: Path) -> None:
    require_module("sklearn", "pip install -e '.[examples]'")
    result = _run(
        str(REPO / "examples/tabular/run_example.py"),
        "--dir",
        "tab",
        "--rows",
        "30000",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "tab" / "out"
    text = pd.read_csv(out / "iris-text/parallel_run_step.txt", sep=" ", header=None)
    assert text.shape == (30000, 3) and text[0].tolist() == list(range(30000))
    with_header = pd.read_csv(out / "iris-csv/parallel_run_step.csv")
    assert list(with_header.columns) == ["id", "species", "probability"]
    assert len(with_header) == 30000
    table = pq.read_table(out / "iris-parquet/parallel_run_step.parquet")
    assert table.num_rows == 30000
    assert table.column_names == ["id", "species", "probability"]
    assert set(with_header.species) <= {"setosa", "versicolor", "virginica"}
