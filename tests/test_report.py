"""The report that outlives the job: ``logs/report.html``, and the live
page's first paint."""

from __future__ import annotations

import os
import re
import shutil
import stat
import urllib.request
from pathlib import Path

import pytest
from distributed import LocalCluster
from PIL import Image

from daskrun import ParallelRunConfig

from .helpers import (
    REPO,
    chromium,
    daskrun,
    files_step,
    job_page,
    poison_files,
    require_chromium,
    start_run,
    write_script,
)

# run() that takes 0.1 s per file and raises for a file named ...-poison
SLOW_POISON = """
import os, time

def init():
    pass

def run(mini_batch):
    time.sleep(0.1)
    for p in mini_batch:
        if "poison" in os.path.basename(p):
            raise ValueError(f"cannot score {os.path.basename(p)}")
    return [os.path.basename(p) for p in mini_batch]
"""


def test_report_is_written_named_and_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job through the CLI leaves logs/report.html (owner-only), names it
    in its last lines, and 'daskrun runs report' builds it again; headless
    Chromium renders it offline, with the summary, the failures and plots."""
    require_chromium()
    poison_files(tmp_path / "in", 40, {3, 17, 29})
    write_script(tmp_path, SLOW_POISON)
    runs = tmp_path / "runs"
    monkeypatch.setenv("DASK_DASKRUN__RESOURCE_INTERVAL", "0.2")
    done = daskrun(
        *("run", "score.py", "--input", "in", "--output", "out"),
        *("--mini-batch-size", "1", "--processes", "2", "--error-threshold", "-1"),
        cwd=tmp_path,
        runs=runs,
    )
    assert done.returncode == 0, done.stderr
    (run_dir,) = (p for p in runs.iterdir() if p.is_dir())
    report = run_dir / "logs" / "report.html"
    tail = (done.stderr + done.stdout).splitlines()[-4:]
    assert any(str(report) in line for line in tail), tail
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    first = report.read_text()
    assert "https://" not in first.split("<body", 1)[0]  # BokehJS inline
    for text in ("Completed", run_dir.name, "f00017-poison.txt", "cannot score"):
        assert text in first, text

    report.unlink()
    again = daskrun("runs", "report", run_dir.name, cwd=tmp_path, runs=runs)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"report: {report}"
    assert report.is_file() and stat.S_IMODE(report.stat().st_mode) == 0o600

    dom = chromium("--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr
    assert "mini_batches_failed" in dom.stdout and "cannot score" in dom.stdout
    shot = tmp_path / "report.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1100,1150", report.as_uri())
    assert taken.returncode == 0, taken.stderr
    with Image.open(shot) as image:
        # the plots drew: lines and bars in colours, not a blank or text page
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16) or []
    assert len(colours) > 200, len(colours)
    blue = sum(n for n, (r, g, b) in colours if b > 150 and r < 100)
    assert blue > 2000, blue  # Bokeh's lines and bars (#1f77b4)
    if os.environ.get("DASKRUN_SCREENSHOT"):
        shutil.copy(shot, os.environ["DASKRUN_SCREENSHOT"])


def test_runs_report_of_an_unknown_run(tmp_path: Path) -> None:
    bad = daskrun("runs", "report", "nope_1", cwd=tmp_path, runs=tmp_path / "runs")
    assert bad.returncode == 2
    assert bad.stderr.startswith("daskrun: error: run 'nope_1' not found"), bad.stderr


def test_report_on_a_failed_init(tmp_path: Path) -> None:
    """A job whose init() fails still leaves a report, naming the cause."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a")
    write_script(
        tmp_path,
        "def init():\n    raise OSError('no model here')\n\n"
        "def run(mini_batch):\n    return mini_batch\n",
    )
    done = daskrun(
        *("run", "score.py", "--input", "in", "--output", "out", "--processes", "1"),
        cwd=tmp_path,
        runs=tmp_path / "runs",
    )
    assert done.returncode == 1
    (run_dir,) = (p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    page = (run_dir / "logs" / "report.html").read_text()
    assert "Failed" in page and "no model here" in page
    assert f"report: {run_dir / 'logs' / 'report.html'}" in done.stderr


def test_live_page_shows_the_job_at_first_paint(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    """The page's HTML, before any script runs, holds the latest job's state,
    not 'waiting for a job…'."""
    poison_files(tmp_path / "in", 6, set())
    script = write_script(tmp_path, SLOW_POISON)
    config = ParallelRunConfig(str(script), mini_batch_size=1, compute_target=cluster)
    job, runs = start_run(files_step(tmp_path, "painted-step", config))
    job.join(120)
    assert runs and runs[0].status == "Completed"
    page, _ = job_page(cluster)
    with urllib.request.urlopen(page, timeout=30) as reply:
        body = reply.read().decode()
    assert "waiting for a job" not in body
    assert runs[0].run_id in body
    assert re.search(r"6/6 done, 0 failed", body), re.findall("id=.summary.>.*", body)


def test_report_picture_in_the_docs() -> None:
    """The docs' Monitoring page shows the report's screenshot, which is
    committed and small."""
    picture = REPO / "docs" / "report.png"
    assert "(report.png)" in (REPO / "docs" / "monitoring.md").read_text()
    assert 10_000 < picture.stat().st_size < 250_000
