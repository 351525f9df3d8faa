"""Fault tolerance with real processes: hung run() calls and dying workers."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from daskrun import Dataset

from .conftest import make_files, run_step

HANGING_SCRIPT = """
import os, time

def init():
    pass

def run(mini_batch):
    for p in mini_batch:
        if os.path.basename(p).startswith("hang"):
            time.sleep(3600)
        if os.path.basename(p).startswith("die"):
            os._exit(3)
    return [os.path.basename(p) for p in mini_batch]
"""


def _report(logs_dir: str) -> pd.DataFrame:
    path = Path(logs_dir) / "sys/job_report/processed_mini-batches.csv"
    return pd.read_csv(path).set_index("index")


def test_hung_run_is_stopped_by_the_timeout(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 1, prefix="hang")
    make_files(tmp_path / "in", 11, prefix="ok")
    start = time.monotonic()
    run = run_step(
        tmp_path,
        HANGING_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1,
        run_invocation_timeout=5,
        run_max_try=2,
        error_threshold=1,
        process_count_per_node=2,
    )
    elapsed = time.monotonic() - start
    assert run.status == "Completed", run.error
    assert run.items_failed == 1 and run.mini_batches_failed == 1
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"ok{i:05d}.txt" for i in range(11)]
    report = _report(run.logs_dir)
    assert report.loc[0, "tries"] == 2
    assert "run_invocation_timeout=5" in report.loc[0, "error"]
    assert (report.drop(index=0)["tries"] == 1).all()
    # two 5 s tries plus worker restarts, not an hour
    assert elapsed < 60, elapsed


def test_a_mini_batch_that_kills_its_worker_fails_after_max_tries(
    tmp_path: Path,
) -> None:
    make_files(tmp_path / "in", 1, prefix="die")
    make_files(tmp_path / "in", 30, prefix="ok")
    run = run_step(
        tmp_path,
        HANGING_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1,
        run_max_try=2,
        error_threshold=1,
        process_count_per_node=2,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"ok{i:05d}.txt" for i in range(30)]
    report = _report(run.logs_dir)
    assert report.loc[0, "tries"] == 2
    assert "WorkerDied" in report.loc[0, "error"]
    # a mini-batch queued on the dying worker may lose a try too, never more
    assert (report.drop(index=0)["tries"] <= 2).all()
    assert report.drop(index=0)["error"].isna().all()
