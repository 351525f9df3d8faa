"""Output at its edges: results that cannot make one table, outputs that
cannot be written, two runs into one folder. Real workers, real files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from distributed import LocalCluster

from daskrun import Dataset

from .conftest import daskrun, run_step, write_script

AS_READ = "def init():\n    pass\n\ndef run(df):\n    return df\n"


def _tables(folder: Path, fmt: str) -> None:
    """Three files, the last with other columns than the first two."""
    folder.mkdir()
    frames = [
        pd.DataFrame({"id": [1, 2], "x": [0.5, 1.5]}),
        pd.DataFrame({"id": [3], "x": [2.5]}),
        pd.DataFrame({"id": [4], "y": ["a"], "z": [7]}),
    ]
    for name, frame in zip("abc", frames, strict=True):
        if fmt == "parquet":
            frame.to_parquet(folder / f"{name}.parquet", index=False)
        else:
            frame.to_csv(folder / f"{name}.csv", index=False)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_results_with_other_columns_fail_naming_both(
    tmp_path: Path, cluster: LocalCluster, fmt: str
) -> None:
    _tables(tmp_path / "in", fmt)
    inputs = (
        Dataset.Tabular.from_parquet_files(str(tmp_path / "in"))
        if fmt == "parquet"
        else Dataset.Tabular.from_delimited_files(str(tmp_path / "in"))
    )
    run = run_step(tmp_path, AS_READ, inputs, output_format=fmt, compute_target=cluster)
    assert run.status == "Failed"
    error = run.error or ""
    assert len(error.splitlines()) == 1, error
    assert f"mini-batch 2 ({tmp_path / 'in' / f'c.{fmt}'}" in error, error
    assert f"mini-batch 0 ({tmp_path / 'in' / f'a.{fmt}'}" in error, error
    assert "['id', 'y', 'z']" in error and "['id', 'x']" in error, error
    assert f"output_format={fmt!r}" in error
    # nothing published
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".daskrun"]


def test_an_empty_first_result_does_not_set_the_header(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    # mini-batch 0 returns no rows (a one-column "result" frame); the header
    # comes from the first result with rows, and every row has its fields
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"{i}.txt").write_text(str(i))
    script = """
import os
import pandas as pd

def init():
    pass

def run(mini_batch):
    if os.path.basename(mini_batch[0]) == "0.txt":
        return []
    return pd.DataFrame({"file": [os.path.basename(p) for p in mini_batch],
                         "n": [1] * len(mini_batch)})
"""
    run = run_step(
        tmp_path,
        script,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1,
        output_format="csv",
        error_threshold=-1,  # 0.txt's missing result is a failed item
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == ["file,n", "1.txt,1", "2.txt,1"]


def test_cli_schema_mismatch_is_one_line_exit_1(tmp_path: Path, runs_dir: Path) -> None:
    _tables(tmp_path / "in", "parquet")
    write_script(tmp_path, AS_READ)
    result = daskrun(
        "run",
        "score.py",
        "--tabular",
        "--input",
        "in",
        "--output",
        "out",
        "--output-format",
        "parquet",
        "--processes",
        "1",
        "-q",
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("daskrun: job failed: mini-batch 2 ("), lines
    assert lines[1].startswith("logs: "), lines
    assert not (tmp_path / "out" / "parallel_run_step.parquet").exists()
