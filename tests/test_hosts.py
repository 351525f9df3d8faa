"""A cluster of several hosts: the scheduler and each worker host with its
own /tmp and home (``tests/hosts.py``), as on any real cluster."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dask.config
import pandas as pd
import pytest
from adlfs import AzureBlobFileSystem
from distributed import Client, LocalCluster

import daskrun
from daskrun import ConfigError, Dataset
from daskrun.backends.inputs.datasets import FileBatch, SubBatch
from daskrun.engine.output import OutputTarget, Parts, committed_parts, prepare_parts
from daskrun.engine.plugin import TryResult
from daskrun.engine.preflight import other_hosts
from daskrun.engine.viaclient import ViaClientTarget, commit
from daskrun.registry.records import RunRecord

from .helpers import (
    AZURITE_KEY,
    VictimKiller,
    committed,
    kill_client,
    make_files,
    poison_files,
    poll_for,
    run_step,
    start_daskrun,
    victim_script,
    wait_for_blob_parts,
    wait_for_parts,
    write_script,
)
from .helpers import daskrun as daskrun_cli
from .hosts import Hosts
from .scripts import POISON_SCRIPT, SLOW_SCRIPT, gated_script

N_FILES = 40


@pytest.fixture
def blobs(azurite: str) -> tuple[AzureBlobFileSystem, str, list[str]]:
    """A container holding ``in/f00000.txt`` ... (their numbers as content)."""
    fs = AzureBlobFileSystem(connection_string=azurite)
    name = f"h{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    names = [f"f{i:05d}.txt" for i in range(N_FILES)]
    for i, file in enumerate(names):
        fs.pipe_file(f"{name}/in/{file}", str(i).encode())
    return fs, name, names


def _output(fs: AzureBlobFileSystem, url: str) -> list[str]:
    fs.invalidate_cache()
    return fs.cat_file(url.removeprefix("abfs://")).decode().splitlines()


def test_the_hosts_see_their_own_tmp_and_home(hosts: Hosts, tmp_path: Path) -> None:
    """What the other tests rest on: no worker host sees the client's /tmp,
    nor the client theirs; all see the shared folder; each has its name."""
    mine = tmp_path / "client-only.txt"
    mine.write_text("x")

    def look(path: str, shared: str) -> tuple[str, bool, bool, str]:
        import socket
        import tempfile

        with tempfile.NamedTemporaryFile(dir="/tmp", delete=False) as f:
            own = f.name
        return socket.gethostname(), os.path.exists(path), os.path.isdir(shared), own

    with hosts.client() as client:
        seen = client.run(look, str(mine), str(hosts.shared))
    assert sorted(name for name, *_ in seen.values()) == ["host-1", "host-2"]
    assert not any(exists for _, exists, _, _ in seen.values())
    assert all(shared for _, _, shared, _ in seen.values())
    for _, _, _, own in seen.values():
        assert not os.path.exists(own)  # another disk than the client's /tmp
    with hosts.client() as client:
        assert len(other_hosts(client)) == 2  # one worker of each host is asked


def test_workers_on_the_client_s_host_are_not_asked(cluster: LocalCluster) -> None:
    with Client(cluster, set_as_default=False) as client:
        assert other_hosts(client) == []


def test_a_datastore_step_is_exact_through_a_worker_kill(
    hosts: Hosts,
    tmp_path: Path,
    azurite: str,
    blobs: tuple[AzureBlobFileSystem, str, list[str]],
) -> None:
    """Inputs and output in Azure Blob (Azurite): a SIGKILL of a worker
    host's worker process mid-mini-batch costs a try, and the output holds
    every file once, in order."""
    fs, name, names = blobs
    marks = hosts.shared / f"marks-{uuid.uuid4().hex[:6]}"
    victims = {names[24]: 1}  # mini-batch 12, while it is in run()
    options = {"connection_string": azurite}
    with hosts.client() as client, VictimKiller(client, marks, victims) as killer:
        run = run_step(
            tmp_path,
            victim_script(marks, victims, seconds=0.01),
            Dataset.File.from_files(f"abfs://{name}/in", storage_options=options),
            output=f"abfs://{name}/out",
            step_options={"output_storage_options": options},
            mini_batch_size=2,
            compute_target=hosts.address,
        )
    (kill,) = killer.check()
    assert run.status == "Completed", run.error
    assert _output(fs, f"abfs://{name}/out/parallel_run_step.txt") == names
    done = (marks / f"{names[24]}.done").read_text().split()
    assert done and str(kill.pid) not in done  # ran again, on a live worker
    hosts.wait_for_workers(2)  # the nanny brought the killed one back


# the client: a step whose inputs and output are on Azure Blob, run on the
# hosts' scheduler (the connection string comes in the environment)
CLIENT = """
import os, sys
from daskrun import Dataset, ParallelRunConfig, ParallelRunStep

options = {"connection_string": os.environ["TEST_CONNECTION_STRING"]}
container, address = sys.argv[1], sys.argv[2]
cfg = ParallelRunConfig("score.py", output_action="append_row",
                        mini_batch_size=2, compute_target=address)
inputs = Dataset.File.from_files(f"abfs://{container}/in", storage_options=options)
step = ParallelRunStep("hosts", cfg, inputs=inputs,
                       output=f"abfs://{container}/out",
                       output_storage_options=options)
print(step.run().status)
"""


def test_a_killed_client_s_run_resumes_exactly_on_the_hosts(
    hosts: Hosts,
    tmp_path: Path,
    runs_dir: Path,
    azurite: str,
    blobs: tuple[AzureBlobFileSystem, str, list[str]],
) -> None:
    fs, name, names = blobs
    go = hosts.shared / f"go-{uuid.uuid4().hex[:6]}"
    write_script(tmp_path, gated_script(go))
    write_script(tmp_path, CLIENT, "client.py")
    env = dict(
        os.environ,
        TEST_CONNECTION_STRING=azurite,
        DASK_DASKRUN__RUNS_DIR=str(runs_dir),
    )
    proc = subprocess.Popen(
        [sys.executable, "client.py", name, hosts.address],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    wait_for_blob_parts(fs, name, 3, proc)  # some parts; the gated one is held
    kill_client(proc)
    go.touch()
    (record,) = RunRecord.find(runs_dir)
    run = daskrun.resume(
        record.run_id,
        storage_options={"connection_string": azurite},
        compute_target=hosts.address,
    )
    assert run.status == "Completed", run.error
    assert _output(fs, f"abfs://{name}/out/parallel_run_step.txt") == names


def test_a_local_input_the_hosts_do_not_see_fails_at_once_in_one_line(
    hosts: Hosts, tmp_path: Path
) -> None:
    """Inputs in the client's /tmp: the job fails before any mini-batch,
    naming the path, the host and the fixes (not 3 tries per file)."""
    files = make_files(tmp_path / "in", 6)
    started = time.monotonic()
    run = run_step(
        tmp_path,
        SLOW_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=2,
        compute_target=hosts.address,
    )
    assert run.status == "Failed"
    assert time.monotonic() - started < 60
    error = run.error or ""
    assert "\n" not in error, error
    assert error.startswith(f"input {files[0]} cannot be read on host host-"), error
    assert "FileNotFoundError" in error
    assert "datastore" in error and "shared file system" in error
    assert run.items_succeeded == run.items_failed == 0  # nothing ran


def test_an_output_the_hosts_do_not_share_is_written_by_the_client(
    hosts: Hosts, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Inputs on a shared file system, output in the client's /tmp:
    via-client turns on, says so in one line, and the output is exact, the
    rows of isolated failed items included (pieces written by the client)."""
    folder = hosts.shared / f"in-{uuid.uuid4().hex[:6]}"
    names = poison_files(folder, 30, poison={13})
    run = run_step(
        tmp_path,
        POISON_SCRIPT,
        Dataset.File.from_files(str(folder)),
        mini_batch_size=4,
        error_threshold=1,
        compute_target=hosts.address,
        show_output=True,
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [n for n in names if "poison" not in n]
    out = capsys.readouterr().err.splitlines()
    said = [line for line in out if "via-client" in line]
    assert len(said) == 1, said
    assert re.fullmatch(
        f"daskrun: output {re.escape(str(tmp_path / 'out'))} is on the client's "
        r"disk \(host host-\d does not see it\): results travel to the client, "
        r"which writes them \(daskrun\.output\.via-client\)",
        said[0],
    ), said


def test_an_unshared_output_with_via_client_off_fails_in_one_line(
    hosts: Hosts, tmp_path: Path
) -> None:
    folder = hosts.shared / f"in-{uuid.uuid4().hex[:6]}"
    make_files(folder, 4)
    with dask.config.set({"daskrun.output.via-client": False}):
        run = run_step(
            tmp_path,
            SLOW_SCRIPT,
            Dataset.File.from_files(str(folder)),
            compute_target=hosts.address,
        )
    assert run.status == "Failed"
    error = run.error or ""
    assert "\n" not in error, error
    assert error.startswith(f"output {tmp_path / 'out'} cannot be written on host ")
    assert "daskrun.output.via-client: true" in error


def test_a_scheduler_without_workers_is_waited_for_then_named(
    mount_namespaces: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """'waiting for workers (0/N)', then a one-line failure once
    daskrun.workers-timeout has passed."""
    make_files(tmp_path / "in", 2)
    with (
        Hosts(tmp_path / "hosts", n=0) as empty,
        dask.config.set({"daskrun.workers-timeout": 3}),
    ):
        started = time.monotonic()
        run = run_step(
            tmp_path,
            SLOW_SCRIPT,
            Dataset.File.from_files(str(tmp_path / "in")),
            compute_target=empty.address,
            process_count_per_node=2,
            show_output=True,
        )
    assert run.status == "Failed"
    assert time.monotonic() - started < 30
    assert run.error == (
        f"no worker joined the scheduler at {empty.address} within 3 s "
        f"(daskrun.workers-timeout); start workers for it ('dask worker "
        f"{empty.address}'), or raise daskrun.workers-timeout"
    )
    assert f"daskrun: waiting for workers (0/2) at {empty.address}" in (
        capsys.readouterr().err
    )


def test_via_client_parts_are_the_client_s_to_write(tmp_path: Path) -> None:
    """Without a cluster: a ViaClientTarget's worker side writes nothing and
    hands the rows back; the client's commit writes them as the part of the
    mini-batch, or of the piece, and a part it cannot write fails the try."""
    target = OutputTarget(str(tmp_path / "out"), "result.txt", "run-1")
    prepare_parts(target)
    via = ViaClientTarget.of(target)
    assert not via.grouped and target.grouped
    assert via.keep(3, b"a\n") == b"a\n"
    assert committed_parts(target) == []
    whole = TryResult(3, 1, True, "w", 1, 1, 0.1, rows=b"a\n")
    assert commit(via, FileBatch.of(3, ["x"]), whole).rows is None
    piece = TryResult(5, 1, True, "w", 1, 1, 0.1, rows=b"c\n")
    commit(via, SubBatch(FileBatch.of(5, ["p", "q", "r"]), 2, 3), piece)
    assert committed_parts(target) == [3]
    assert Parts(target).pieces == {5: [(2, 3)]}
    gone = ViaClientTarget.of(OutputTarget(str(tmp_path / "nowhere"), "r.txt", "r"))
    failed = commit(gone, FileBatch.of(0, ["x"]), whole)
    assert not failed.ok and failed.rows is None
    assert "writing its part on the client" in (failed.error or "")


# f00010.txt's first try waits to be killed (its pid in PID); f00039.txt's
# mini-batch waits for GO
KILLED_AND_GATED_SCRIPT = """
import os, time

def init():
    pass

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    if "f00010.txt" in names and not os.path.exists({killed!r}):
        with open({pid!r} + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace({pid!r} + ".tmp", {pid!r})
        time.sleep(120)
    while "f00039.txt" in names and not os.path.exists({go!r}):
        time.sleep(0.05)
    return names
"""


def test_via_client_is_exact_through_a_worker_kill_and_a_resume(
    hosts: Hosts, tmp_path: Path, runs_dir: Path
) -> None:
    """The CLI, inputs on a shared file system, output in the client's /tmp
    (via-client): a host's worker killed in run(), then the client killed;
    the resume runs only what the client had not written, and the output
    holds every file once, in order."""
    marks = hosts.shared / f"marks-{uuid.uuid4().hex[:6]}"
    files = make_files(marks / "in", N_FILES)
    pid, killed, go = marks / "pid", marks / "killed", marks / "go"
    write_script(
        tmp_path,
        KILLED_AND_GATED_SCRIPT.format(pid=str(pid), killed=str(killed), go=str(go)),
    )
    # a task per mini-batch: the held one holds no other
    proc = start_daskrun(
        "run", "score.py", "--input", str(marks / "in"), "--output", "out",
        "--mini-batch-size", "2", "--scheduler", hosts.address,
        cwd=tmp_path, runs=runs_dir, DASK_DASKRUN__RUNNER__TASK_SECONDS="0",
    )  # fmt: skip
    poll_for(pid.exists, timeout=120, what=f"{pid} to be written", running=proc)
    victim = int(pid.read_text())
    assert victim in [p for h in hosts.hosts for p in h.worker_pids()]
    killed.touch()
    os.kill(victim, signal.SIGKILL)
    wait_for_parts(tmp_path / "out", 19, proc)  # all but the held one
    kill_client(proc)
    _, err = proc.communicate()
    assert "(daskrun.output.via-client)" in err, err
    written = committed(tmp_path / "out")
    assert 19 not in written  # f00039.txt's mini-batch is held
    go.touch()
    (record,) = RunRecord.find(runs_dir)
    resumed = daskrun_cli(
        "resume", record.run_id, "--scheduler", hosts.address, cwd=tmp_path,
        runs=runs_dir,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == [f.name for f in files]
    hosts.wait_for_workers(2)


def test_credentials_only_the_client_has_fail_at_once_naming_the_host(
    hosts: Hosts,
    tmp_path: Path,
    runs_dir: Path,
    azurite: str,
    blobs: tuple[AzureBlobFileSystem, str, list[str]],
) -> None:
    """The CLI with the connection string in the client's environment alone:
    the hosts cannot read the inputs, which the job says before any
    mini-batch, without the secret."""
    _, name, _ = blobs
    write_script(tmp_path, SLOW_SCRIPT)
    done = daskrun_cli(
        "run", "score.py", "--input", f"abfs://{name}/in", "--output", "out",
        "--scheduler", hosts.address, "-q",
        cwd=tmp_path, runs=runs_dir, timeout=120,
        AZURE_STORAGE_CONNECTION_STRING=azurite,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "cannot be read" in x]
    assert line.startswith(
        f"daskrun: job failed: input abfs://{name}/in/f00000.txt cannot be read "
        "on host host-"
    ), line
    assert "storage_options" in line and "AZURE_STORAGE_CONNECTION_STRING" in line
    assert AZURITE_KEY not in done.stderr + done.stdout


def test_csv_rows_on_a_datastore_to_a_local_output_are_exact(
    hosts: Hosts,
    tmp_path: Path,
    azurite: str,
    blobs: tuple[AzureBlobFileSystem, str, list[str]],
) -> None:
    """A CSV in Azure Blob cut into byte ranges that the hosts read, its rows
    written by the client (via-client) into a local CSV output: every row
    once, in order."""
    fs, name, _ = blobs
    frame = pd.DataFrame({"id": range(3000), "v": [i * 7 % 101 for i in range(3000)]})
    fs.pipe_file(f"{name}/t/a.csv", frame.to_csv(index=False).encode())
    options = {"connection_string": azurite}
    run = run_step(
        tmp_path,
        "def init(): pass\ndef run(df):\n    return df.assign(w=df['v'] * 2)\n",
        Dataset.Tabular.from_delimited_files(
            f"abfs://{name}/t/*.csv", storage_options=options
        ),
        mini_batch_size="4KB",
        output_format="csv",
        compute_target=hosts.address,
    )
    assert run.status == "Completed", run.error
    assert run.mini_batches_total > 3
    out = pd.read_csv(run.output_path or "")
    pd.testing.assert_frame_equal(out, frame.assign(w=frame["v"] * 2))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("output.via-client", "sometimes", "is not true, false or null"),
        ("workers-timeout", "soon", "is not a number of seconds"),
    ],
)
def test_a_bad_setting_fails_before_anything_starts(
    tmp_path: Path, key: str, value: str, message: str
) -> None:
    make_files(tmp_path / "in", 2)
    with (
        dask.config.set({f"daskrun.{key}": value}),
        pytest.raises(ConfigError, match=f"daskrun.{key}='{value}' {message}"),
    ):
        run_step(tmp_path, SLOW_SCRIPT, Dataset.File.from_files(str(tmp_path / "in")))
