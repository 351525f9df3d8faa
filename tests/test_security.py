"""The local cluster daskrun starts admits no one else: real processes that
try to connect without the job's credentials."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

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
