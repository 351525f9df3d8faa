"""Failures at the level of one item: a mini-batch that failed its last try
is split, down to single items, so the good ones are scored and only the
poison ones count as failed (``daskrun.isolate-failures``); the failed ones
form a data set of their own, and ``--retry-failed`` runs only them."""

from __future__ import annotations

from pathlib import Path

import dask
import pandas as pd
import pytest
from distributed import LocalCluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daskrun import Dataset, StepRun

from .helpers import daskrun, make_files, run_step

POISON_SCRIPT = """
import os

def init():
    pass

def run(mini_batch):
    for p in mini_batch:
        if "poison" in os.path.basename(p):
            raise ValueError(f"cannot score {os.path.basename(p)}")
    return [os.path.basename(p) for p in mini_batch]
"""


def _poison_files(folder: Path, n: int, poison: set[int]) -> list[str]:
    """``n`` files in name order, those at ``poison`` named ``...-poison``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"f{i:05d}{'-poison' if i in poison else ''}.txt"
        (folder / name).write_text(str(i))
        names.append(name)
    return names


def _failed_items(run: StepRun) -> pd.DataFrame:
    return pd.read_csv(
        Path(run.logs_dir) / "sys/job_report/failed_items.csv",
        keep_default_na=False,
    )


def test_poison_files_are_isolated(tmp_path: Path, cluster: LocalCluster) -> None:
    names = _poison_files(tmp_path / "in", 100, {7, 50, 93})
    run = run_step(
        tmp_path,
        POISON_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        compute_target=cluster.scheduler_address,
        mini_batch_size=100,
        error_threshold=3,
        run_max_try=2,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [n for n in names if "poison" not in n]
    assert (run.items_succeeded, run.items_failed) == (97, 3)
    assert run.mini_batches_failed == 1
    failed = _failed_items(run)
    assert [Path(p).name for p in failed["input"]] == [
        "f00007-poison.txt",
        "f00050-poison.txt",
        "f00093-poison.txt",
    ]
    assert list(failed["error"]) == [
        f"ValueError: cannot score {name}"
        for name in ("f00007-poison.txt", "f00050-poison.txt", "f00093-poison.txt")
    ]
    assert list(zip(failed["start"], failed["stop"], strict=True)) == [
        (7, 8),
        (50, 51),
        (93, 94),
    ]
