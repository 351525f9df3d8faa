"""The file of ``daskrun cluster start`` is trusted only if it is the user's
own: owned by them, mode 0600, in a folder no one else may write to.
Anything else is refused in one line, and nothing connects to the address
it names."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daskrun import Dataset
from daskrun.backends.compute.cluster import SharedCluster
from daskrun.exceptions import ConfigError

from .helpers import daskrun, make_files, run_step, silent_server
from .scripts import ECHO


@pytest.fixture
def attacker() -> Iterator[tuple[socket.socket, int]]:
    """A port on 127.0.0.1 that accepts connections (and never answers),
    and a live process that looks like ``daskrun cluster serve``: what a
    planted file would name."""
    decoy = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "cluster", "serve"]
    )
    try:
        with silent_server() as listener:
            yield listener, decoy.pid
    finally:
        decoy.kill()
        decoy.wait()


def _plant(path: Path, pid: int, port: int) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"address": f"tcp://127.0.0.1:{port}", "pid": pid, "workers": 1,
             "dashboard": None, "ca": "", "cert": "", "key": ""}
        )
    )  # fmt: skip
    path.chmod(0o600)


def _file_readable_by_all(path: Path) -> str:
    path.chmod(0o644)
    return "mode is 0644"


def _file_writable_by_all(path: Path) -> str:
    path.chmod(0o666)
    return "mode is 0666"


def _folder_writable_by_all(path: Path) -> str:
    path.parent.chmod(0o777)  # and not sticky: others may replace the file
    return "writable by others"


def _file_of_another_user(path: Path) -> str:
    os.chown(path, 65534, 65534)
    return "owned by uid 65534"


UNSAFE = [
    _file_readable_by_all,
    _file_writable_by_all,
    _folder_writable_by_all,
    _file_of_another_user,
]


@pytest.mark.parametrize("unsafe", UNSAFE, ids=lambda f: f.__name__.strip("_"))
def test_a_file_not_the_users_own_is_refused(
    tmp_path: Path,
    shared_cluster_file: Path,
    attacker: tuple[socket.socket, int],
    unsafe: Callable[[Path], str],
) -> None:
    listener, pid = attacker
    _plant(shared_cluster_file, pid, listener.getsockname()[1])
    why = unsafe(shared_cluster_file)

    with pytest.raises(ConfigError, match=why) as refused:
        SharedCluster.find()
    assert str(shared_cluster_file) in str(refused.value)

    status = daskrun("cluster", "status", cwd=tmp_path, runs=tmp_path / "runs")
    assert status.returncode == 2
    lines = status.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], status.stderr
    assert str(shared_cluster_file) in lines[0]
    assert shared_cluster_file.exists()  # not ours to remove


def test_a_job_refuses_a_planted_file_and_never_connects(
    tmp_path: Path, shared_cluster_file: Path, attacker: tuple[socket.socket, int]
) -> None:
    listener, pid = attacker
    _plant(shared_cluster_file, pid, listener.getsockname()[1])
    _file_of_another_user(shared_cluster_file)
    make_files(tmp_path / "in", 2)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        inputs = [Dataset.File.from_files(str(tmp_path / "in"))]
        run_step(tmp_path, ECHO, inputs, mini_batch_size=1)
    with pytest.raises(TimeoutError):  # nobody came
        listener.accept()
