"""The local cluster daskrun starts admits no one else: real processes that
try to connect without the job's credentials."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urljoin

import pytest
from distributed import LocalCluster

from daskrun import Dataset

from .helpers import make_files, run_step

# run() publishes the scheduler's address, then waits (bounded) until the
# test has tried to get in
WAITING_SCRIPT = """
import os, time
from distributed import get_worker

def init():
    pass

def run(mini_batch):
    here = os.path.dirname(mini_batch[0])
    with open(os.path.join(here, "..", "address.tmp"), "w") as f:
        f.write(get_worker().scheduler.address)
    os.replace(os.path.join(here, "..", "address.tmp"),
               os.path.join(here, "..", "address"))
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(here, "..", "go")):
        if time.monotonic() > deadline:
            raise TimeoutError("the test never said go")
        time.sleep(0.05)
    return [os.path.basename(p) for p in mini_batch]
"""

INTRUDER = """
import sys
from distributed import Client
from distributed.security import Security

address, how = sys.argv[1], sys.argv[2]
if how == "own-certificates":
    security = Security.temporary()
else:
    security = None
    if how == "tcp":
        address = "tcp://" + address.split("://", 1)[1]
try:
    client = Client(address, timeout=5, security=security)
except Exception as e:
    print(f"refused: {type(e).__name__}")
    sys.exit(0)
# got in: prove it by running code on every worker as the job's user
print("ran on", client.run(lambda: 42))
sys.exit(1)
"""


def test_no_one_else_gets_into_the_local_cluster(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 2)
    outcome: dict[str, object] = {}

    def job() -> None:
        outcome["run"] = run_step(
            tmp_path,
            WAITING_SCRIPT,
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=2,
            process_count_per_node=1,
        )

    thread = threading.Thread(target=job)
    thread.start()
    try:
        address_file = tmp_path / "address"
        for _ in range(1200):
            if address_file.exists() or not thread.is_alive():
                break
            thread.join(0.1)
        address = address_file.read_text()
        for how in ("plain", "tcp", "own-certificates"):
            intruder = subprocess.run(
                [sys.executable, "-c", INTRUDER, address, how],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert intruder.returncode == 0, (how, intruder.stdout, intruder.stderr)
            assert "refused" in intruder.stdout, (how, intruder.stdout)
        assert address.startswith("tls://127.0.0.1:"), address
    finally:
        (tmp_path / "go").touch()
        thread.join(120)
    run = outcome["run"]
    assert run.status == "Completed", run.error  # type: ignore[attr-defined]
    assert Path(run.output_path).read_text().split() == [  # type: ignore[attr-defined]
        "f00000.txt",
        "f00001.txt",
    ]
    # the dashboard stays plain HTTP on 127.0.0.1
    assert (run.dashboard_link or "").startswith(  # type: ignore[attr-defined]
        "http://127.0.0.1:"
    )


# run() that prints, logs and fails one mini-batch: every log file is written
LOGS_SCRIPT = """
import os
from daskrun import EntryScript

def init():
    print("init")

def run(mini_batch):
    EntryScript().logger.warning("run")
    if os.path.basename(mini_batch[0]).startswith("bad"):
        raise ValueError("bad input")
    return [os.path.basename(p) for p in mini_batch]
"""


def test_run_folders_and_logs_belong_to_their_owner(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "in", 2)
    make_files(tmp_path / "in", 1, prefix="bad")
    run = run_step(
        tmp_path,
        LOGS_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1,
        run_max_try=1,
        error_threshold=-1,
        process_count_per_node=1,
    )
    # a resume writes logs again (its code is the script's folder, as the
    # run's: source.zip stays the only copy in the run folder)
    resumed = run.resume(retry_failed=True)
    assert resumed.status == "Completed", resumed.error
    logs = Path(run.logs_dir)
    for name in ("job_error.txt", "user/stdout", "user/entry_script_log", "perf"):
        assert (logs / name).exists(), name
    assert (Path(run.logs_dir).parent / "source.zip").is_file()
    modes = {
        str(path.relative_to(runs_dir)): stat.S_IMODE(path.stat().st_mode)
        for path in [runs_dir, *runs_dir.rglob("*")]
    }
    assert "runs.db" in modes and len(modes) > 15, modes
    others = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o700 if (runs_dir / name).is_dir() else 0o600)
    }
    assert not others, others


def _curl(url: str) -> tuple[int, str]:
    """Another process's GET of ``url``: the status and the body."""
    got = subprocess.run(
        ["curl", "-s", "-m", "30", "-w", "\n%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    body, _, status = got.stdout.rpartition("\n")
    return int(status), body


def test_the_job_page_answers_only_the_printed_link(
    tmp_path: Path, cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    make_files(tmp_path / "in", 1)
    make_files(tmp_path / "in", 1, prefix="bad")
    run = run_step(
        tmp_path,
        LOGS_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1,
        run_max_try=1,
        error_threshold=-1,
        compute_target=cluster,
        show_output=True,
    )
    printed = re.search(r"\(this job: (\S+)\)", capsys.readouterr().err)
    assert printed is not None
    page = printed.group(1)
    assert page.startswith(urljoin(cluster.dashboard_link, "daskrun?token="))
    plots = page.replace("/daskrun?", "/daskrun/plots?")
    status, body = _curl(plots)
    assert status == 200 and run.run_id in body and "worker-" in body, body[:300]
    status, body = _curl(page)
    assert status == 200 and "<title>daskrun job</title>" in body
    base = urljoin(cluster.dashboard_link, "daskrun")
    for url in (base, base + "/", base + "/plots", base + "/plots?token=guess"):
        status, body = _curl(url)
        assert status == 403 and run.run_id not in body, (url, status, body)
        assert "open the page at the link daskrun printed" in body, body
