"""Progress tells the truth: no ETA while ``init()`` runs, which shows the
workers ready out of the total, and an ETA from the run phase only."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import REPO, make_files, start_daskrun, write_script

# the first worker to reach init() is ready after 2 s, the other after 5 s
SLOW_INIT = """
import os, time

def init():
    try:
        os.close(os.open({marker!r}, os.O_CREAT | os.O_EXCL))
        time.sleep(2)
    except FileExistsError:
        time.sleep(5)

def run(mini_batch):
    time.sleep(0.1)
    return [os.path.basename(p) for p in mini_batch]
"""

ETA = re.compile(r"ETA (\d+) s")


@pytest.mark.slow
def test_eta_comes_from_the_run_phase_and_init_shows_workers_ready(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "in", 60)
    script = write_script(
        tmp_path, SLOW_INIT.format(marker=str(tmp_path / "first-init"))
    )
    proc = start_daskrun(
        "run", str(script), "--input", "in", "--output", "out",
        "--mini-batch-size", "1", "--processes", "2",
        cwd=tmp_path, runs=runs_dir, stdout=subprocess.DEVNULL,
        PYTHONPATH=str(REPO), DASK_DASKRUN__PROGRESS_INTERVAL="0.3",
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[tuple[float, str]] = []  # (when it came, the line)
    for line in proc.stderr:
        lines.append((time.monotonic(), line.rstrip("\n")))
    assert proc.wait(timeout=300) == 0, "\n".join(text for _, text in lines)
    shown = "\n".join(text for _, text in lines)
    end = next(t for t, text in lines if text.startswith("daskrun: Completed"))

    init = [text for _, text in lines if "init()" in text]
    assert init, shown
    assert all("/2 workers" in text and "ETA" not in text for text in init), shown
    assert any("init() on 1/2 workers" in text for text in init), shown
    assert len(init) == len(set(init)), shown  # off a TTY: no line twice
    # nothing before the last init() line guesses a finishing time
    last_init = max(i for i, (_, text) in enumerate(lines) if "init()" in text)
    assert not any(ETA.search(text) for _, text in lines[:last_init]), shown

    etas = [
        (float(m.group(1)), end - t)
        for t, text in lines
        if (m := ETA.search(text)) is not None
    ]
    assert etas, shown
    for eta, real in etas:
        # measured from the start (cluster start-up, 5 s of init()), the
        # first ETA said ~60 s for ~3 s of mini-batches
        assert real / 3 - 1 <= eta <= max(2 * real, real + 3), (eta, real, lines)
