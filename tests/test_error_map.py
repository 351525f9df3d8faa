"""One error map (daskrun.backends.storage.map_errors): storage and I/O
failures become daskrun's errors, a timeout is one StorageTimeoutError (exit
status 1) whether it came while listing or reading, and a bug is never
relabelled. The CLI case reaches a real, closed port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daskrun.backends.inputs.listing import _bounded, _reading
from daskrun.backends.storage import map_errors, storage_errors, storage_failures
from daskrun.engine.output import OutputTarget, assemble, prepare_parts
from daskrun.exceptions import (
    InputError,
    OutputError,
    StorageError,
    StorageTimeoutError,
)

from .helpers import free_port, write_script

KEY = "c2VjcmV0LWtleS1uZXZlci1zaG93bg=="


def _bug() -> None:
    raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")


def test_a_bug_in_a_mapped_block_stays_a_type_error() -> None:
    with pytest.raises(TypeError, match="unsupported operand"):
        with map_errors(lambda e: InputError(str(e))):
            _bug()
    for bug in (AttributeError("x"), KeyError("k")):
        with pytest.raises(type(bug)):
            with map_errors(lambda e: InputError(str(e))):
                raise bug
    with pytest.raises(TypeError):
        with storage_errors("d", {}, "upload"):
            _bug()
    with pytest.raises(TypeError):
        with _reading("a.csv", {}):
            _bug()
    with pytest.raises(TypeError):
        _bounded(_bug, 5, "datastore 'd'", {})


def test_storage_failures_map_and_keep_no_credentials() -> None:
    assert TypeError not in storage_failures()
    with pytest.raises(InputError, match=r"^input file 'a.csv' cannot be read"):
        with _reading("a.csv", {"account_key": KEY}):
            raise PermissionError(f"key {KEY} refused")
    with pytest.raises(InputError, match="refused the listing") as caught:
        _bounded(
            lambda: (_ for _ in ()).throw(OSError(f"no {KEY}")),
            5,
            "datastore 'd'",
            {"account_key": KEY},
        )
    assert KEY not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_timeout_is_one_error_from_listing_and_reading() -> None:
    # a listing that runs past its bound, a listing whose storage timed out,
    # and a read that timed out: the same error, the same exit status
    with pytest.raises(StorageTimeoutError, match="did not answer within 0.2 s"):
        _bounded(lambda: time.sleep(5), 0.2, "datastore 'd'", {})
    with pytest.raises(StorageTimeoutError) as listing:
        _bounded(_timeout, 5, "datastore 'd'", {})
    with pytest.raises(StorageTimeoutError) as reading:
        with _reading("abfs://c/a.csv", {}):
            _timeout()
    with pytest.raises(StorageTimeoutError) as datastore:
        with storage_errors("d", {}, "listing"):
            _timeout()
    for caught in (listing, reading, datastore):
        assert isinstance(caught.value, StorageError)
        assert isinstance(caught.value, TimeoutError)
        assert not isinstance(caught.value, ValueError)  # not a usage error
        assert "daskrun.storage-timeout" in str(caught.value)


def _timeout() -> None:
    raise TimeoutError("no answer")


def test_assembling_maps_storage_failures_but_not_bugs(tmp_path: Path) -> None:
    target = OutputTarget(str(tmp_path / "out"), "out.txt", "r1")
    prepare_parts(target)
    (Path(target.parts_url) / f"{0:010d}.part").write_bytes(b"a\n")
    (tmp_path / "out" / "out.txt").mkdir()  # where the file goes: a folder
    with pytest.raises(OutputError, match="publishing .* failed; nothing was"):
        assemble(target, [True])
    with pytest.raises(TypeError):
        assemble(target, None)  # type: ignore[arg-type]  # a caller's bug
    # the parts are kept: the run can be resumed
    assert (Path(target.parts_url) / f"{0:010d}.part").exists()


def test_cli_listing_timeout_is_exit_status_1(tmp_path: Path) -> None:
    # an Azure Blob endpoint on a closed port, its credentials from the
    # environment: the listing gives up after daskrun.storage-timeout
    port = free_port()
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={KEY};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    write_script(tmp_path, "def init(): pass\ndef run(mb): return mb\n")
    runs = tmp_path / "runs"
    env = dict(
        os.environ,
        AZURE_STORAGE_CONNECTION_STRING=connection,
        DASK_DASKRUN__STORAGE_TIMEOUT="3",
        DASK_DASKRUN__RUNS_DIR=str(runs),
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "daskrun", "run", "score.py"]
        + ["--input", "abfs://scores/in", "--output", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 20
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "daskrun: storage for ['abfs://scores/in'] did not answer within 3 s; "
        "check its endpoint, network and credentials (the bound is "
        "daskrun.storage-timeout)"
    ]
    assert KEY not in result.stderr
    assert not runs.exists()  # no run was started
