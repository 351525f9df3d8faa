"""``mini_batch_size="auto"`` shrinks after a timeout, on real worker
processes (daskrun.engine.shrink): a pilot of fast files followed by slow
ones chooses mini-batches that outlast ``run_invocation_timeout``; the one
that timed out runs again in pieces, and so does every one after."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import pytest

from daskrun import Dataset

from .helpers import make_files, run_step

# the pilot's eight files are fast; every file after takes 0.2 s
HOSTILE = """
import os, time

def init():
    pass

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    time.sleep(0.2 * sum(name >= "f00008.txt" for name in names))
    return names
"""


@pytest.mark.slow
def test_auto_shrinks_after_a_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_files(tmp_path / "in", 120, prefix="f")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="daskrun"):
        run = run_step(
            tmp_path,
            HOSTILE,
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size="auto",
            run_invocation_timeout=2,
            error_threshold=0,
            process_count_per_node=2,
        )
    elapsed = time.monotonic() - start
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"f{i:05d}.txt" for i in range(120)]
    assert (run.items_succeeded, run.items_failed) == (120, 0)

    # 112 slow files for 2 workers: 28 a mini-batch, 5.6 s, over the 2 s
    # timeout; a quarter of them takes 1.4 s
    shrunk = [r.getMessage() for r in caplog.records if "took over" in r.message]
    assert shrunk == [
        "daskrun: auto: mini-batches of 28 took over the 2 s timeout; now 7"
    ]
    report = pd.read_csv(
        Path(run.logs_dir) / "sys/job_report/processed_mini-batches.csv"
    )
    assert list(report["items_in"]) == [1] * 8 + [28] * 4
    # the mini-batches in flight when the first timed out ran twice (the
    # timeout, then in pieces); those after were cut before they started
    tries = report["tries"].tolist()
    assert tries[:8] == [1] * 8 and set(tries[8:]) <= {1, 2}, tries
    assert sum(t == 2 for t in tries) <= 2, tries
    # 22.4 s of work on 2 workers; full mini-batches would time out on each
    # of their 3 tries (12 timeouts, each restarting a worker)
    assert elapsed < 60, elapsed
