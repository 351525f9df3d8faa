"""Monitoring: the progress display, the dashboard page, the log folder."""

from __future__ import annotations

import csv
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

import pytest
from distributed import LocalCluster

from daskrun import Dataset, ParallelRunConfig, ParallelRunStep
from daskrun.monitoring.dashboard import install_page
from daskrun.registry.compute import connect, dashboard_link

from .helpers import (
    REPO,
    chromium,
    files_step,
    job_page,
    job_plots,
    make_files,
    require_chromium,
    start_run,
    write_script,
)
from .scripts import SLOW_SCRIPT


def _get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


def test_dashboard_page_shows_the_running_job(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    require_chromium()
    make_files(tmp_path / "in", 120)
    script = write_script(tmp_path, SLOW_SCRIPT)
    config = ParallelRunConfig(str(script), mini_batch_size=1, compute_target=cluster)
    job, runs = start_run(files_step(tmp_path, "watched-step", config))
    page, plots = job_page(cluster)
    data = job_plots(  # the page appears, then the job's first snapshot
        plots,
        "watched-step_",
        lambda data: "worker-" in str(data.get("summary")),
        what="the daskrun page",
    )
    dom = chromium("--dump-dom", page)
    assert dom.returncode == 0, dom.stderr
    assert (
        str(data["run_id"]).startswith("watched-step_") and data["run_id"] in dom.stdout
    )
    assert re.search(r"\d+/120 done", dom.stdout), dom.stdout[-2000:]
    assert re.search(r"worker-\d.*items/s", dom.stdout)  # per-worker throughput
    assert 'id="progress" data-rendered="1"' in dom.stdout  # Bokeh plots drawn
    assert 'id="workers" data-rendered="1"' in dom.stdout
    shot = tmp_path / "dashboard.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1150,820", page)
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr
    if os.environ.get("DASKRUN_SCREENSHOT"):
        shutil.copy(shot, os.environ["DASKRUN_SCREENSHOT"])
    job.join(120)
    assert runs and runs[0].status == "Completed"


def test_dask_dashboard_connects_on_first_visit() -> None:
    """On the cluster daskrun starts, Dask's dashboard is connected when it is
    first asked for (Bokeh's import is kept out of the start), at the link
    printed at the start, beside the daskrun page."""
    with connect(None, node_count=1, process_count_per_node=1) as client:
        link = dashboard_link(client)
        assert link is not None and link.startswith("http://127.0.0.1:")
        page = install_page(client, link)
        assert page is not None and page.startswith(urljoin(link, "daskrun?token="))
        with urllib.request.urlopen(page, timeout=30) as reply:
            assert reply.status == 200  # served before the dashboard is
        with urllib.request.urlopen(link, timeout=60) as reply:
            body = reply.read().decode()
            assert reply.status == 200 and reply.geturl() == link
        assert "bokeh" in body.lower() and "Dask" in body
        with urllib.request.urlopen(urljoin(link, "/"), timeout=30) as reply:
            assert reply.geturl() == link  # the root still leads to the status
        with urllib.request.urlopen(urljoin(link, "workers"), timeout=30) as reply:
            assert reply.status == 200 and "bokeh" in reply.read().decode().lower()
        with urllib.request.urlopen(page, timeout=30) as reply:
            assert reply.status == 200


def _cli(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "daskrun",
        "run",
        str(tmp_path / "score.py"),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--mini-batch-size",
        "1",
        "--processes",
        "2",
        *args,
    ]


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, DASK_DASKRUN__RUNS_DIR=str(tmp_path / "runs"))


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 40)
    write_script(tmp_path, SLOW_SCRIPT)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        _cli(tmp_path),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=_env(tmp_path),
        cwd=REPO,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data.decode(errors="replace"))
    proc.wait(120)
    out = "".join(chunks)
    assert proc.returncode == 0, out
    counts = [int(n) for n in re.findall(r"\| *(\d+)/40 \[", out)]
    assert len(set(counts)) >= 3 and counts == sorted(counts), out  # it advances
    assert counts[-1] == 40
    assert "items ok=" in out and "mini-batch/s" in out
    # one item a mini-batch, none failing: each frame's count and text agree
    frames = re.findall(r"\| *(\d+)/40 \[[^\]\r]*items ok=(\d+)", out)
    assert frames and all(n == ok for n, ok in frames), frames


def test_plain_progress_lines_in_a_file(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 60)
    write_script(tmp_path, SLOW_SCRIPT)
    with open(tmp_path / "log.txt", "w") as log:
        started = time.monotonic()
        result = subprocess.run(
            _cli(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(_env(tmp_path), DASK_DASKRUN__PROGRESS_INTERVAL="2"),
            cwd=REPO,
            timeout=120,
        )
        elapsed = time.monotonic() - started
    text = (tmp_path / "log.txt").read_text()
    assert result.returncode == 0, text
    assert "\r" not in text and "%|" not in text  # no bar in a file
    lines = re.findall(r"daskrun: (\d+)/60 mini-batches, .* items/s", text)
    assert 1 <= len(lines) <= elapsed / 2 + 1, text
    assert "daskrun: Completed: 60 of 60 mini-batches done; 60 items ok" in text


FAILING_SCRIPT = """\
import os


def init():
    pass


def run(mini_batch):
    out = []
    for path in mini_batch:
        if "f00003" in path:
            return 1 / 0
        out.append(os.path.basename(path))
    return out
"""


def test_the_real_error_comes_first(tmp_path: Path) -> None:
    assert FAILING_SCRIPT.splitlines()[11].strip() == "return 1 / 0"  # line 12
    make_files(tmp_path / "in", 6)
    (tmp_path / "score.py").write_text(FAILING_SCRIPT)
    result = subprocess.run(
        _cli(tmp_path, "--max-tries", "1"),
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-4:]
    assert any("ZeroDivisionError: division by zero" in line for line in last), last
    assert any(f"{tmp_path / 'score.py'}, line 12, in run" in line for line in last)
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    error = (run_dir / "logs" / "job_error.txt").read_text()
    assert error.startswith("ZeroDivisionError: division by zero\nTraceback")
    assert f'File "{tmp_path / "score.py"}", line 12, in run' in error


LOGGING_SCRIPT = """
import os
from daskrun import EntryScript

def init():
    entry = EntryScript()
    entry.logger.info("init on %s", entry.agent_name)
    print(f"init printed on {entry.agent_name}")
    assert os.path.isdir(entry.log_dir) and entry.output_dir

def run(mini_batch):
    entry = EntryScript()
    entry.logger.info("run got %d files", len(mini_batch))
    entry.logger.warning("a warning about %s", os.path.basename(mini_batch[0]))
    print("printed for", os.path.basename(mini_batch[0]))
    return [os.path.basename(p) for p in mini_batch][:2]  # one short per 3
"""


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_per_worker_logs_and_report(
    tmp_path: Path, cluster: LocalCluster, level: str
) -> None:
    make_files(tmp_path / "in", 12)
    script = write_script(tmp_path, LOGGING_SCRIPT)
    step = ParallelRunStep(
        "logging-step",
        ParallelRunConfig(
            str(script),
            mini_batch_size=3,
            error_threshold=-1,
            logging_level=level,
            compute_target=cluster,
        ),
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    )
    run = step.run()
    assert run.status == "Completed", run.error
    logs = Path(run.logs_dir)
    stdout = "".join(p.read_text() for p in (logs / "user/stdout").glob("worker-*.txt"))
    script_log = "".join(
        p.read_text() for p in (logs / "user/entry_script_log").glob("worker-*.txt")
    )
    for i in (0, 3, 6, 9):
        assert f"printed for f{i:05d}.txt" in stdout
        assert f"WARNING a warning about f{i:05d}.txt" in script_log
    assert "init printed on worker-" in stdout
    assert ("INFO run got 3 files" in script_log) == (level == "INFO")
    assert ("INFO init on worker-" in script_log) == (level == "INFO")
    with open(logs / "sys/job_report/processed_mini-batches.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["index"]) for r in rows) == [0, 1, 2, 3]
    assert all(
        (r["items_in"], r["items_ok"], r["items_failed"]) == ("3", "2", "1")
        for r in rows
    )
    assert all(r["worker"].startswith("worker-") and int(r["tries"]) == 1 for r in rows)
    overview = (logs / "job_progress_overview.txt").read_text()
    assert "status: Completed" in overview and "mini-batches: 4/4 done" in overview
