"""The storage back ends' contract, run against every back end (a local folder
and a real Azurite), and the one error map, against real failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from fsspec.core import url_to_fs

import daskrun.engine.runner
from daskrun import (
    Canceled,
    ConfigError,
    Datastore,
    StorageError,
    StorageTimeoutError,
    Workspace,
)
from daskrun.backends.storage import storage_errors
from daskrun.registry.datastores import BACKENDS, AzureBlobContainer, LocalFolder

from .helpers import REPO, free_port

# base64, as an account key must be, but not Azurite's
BAD_KEY = "YmFkLWtleS1iYWQta2V5LWJhZC1rZXktYmFkLWtleQ=="


def _blob_endpoint(connection_string: str) -> str:
    parts = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)
    return parts["BlobEndpoint"]


@pytest.fixture(params=["local", "azure_blob"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Datastore:
    ws = Workspace.create(tmp_path / "ws")
    if request.param == "local":
        return Datastore.register_local(ws, "folder", tmp_path / "folder")
    return Datastore.register_azure_blob_container(
        ws,
        "blobs",
        f"c{uuid.uuid4().hex[:12]}",
        "devstoreaccount1",
        connection_string=request.getfixturevalue("azurite"),
        create_if_not_exists=True,
    )


def test_backend_contract(store: Datastore, tmp_path: Path) -> None:
    backend = store.backend
    assert BACKENDS[store.kind] is type(backend)
    assert store.kind == backend.kind

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    store.upload(str(src), "in/")

    # listing: paths on the datastore
    assert backend.find("in") == ["in/a.txt", "in/sub/b.txt"]
    # URL and storage options reach the same file through fsspec
    fs, path = url_to_fs(store.url("in/sub/b.txt"), **store.storage_options)
    assert fs.cat_file(path) == b"b"

    # upload refuses to replace a file unless told to
    with pytest.raises(ConfigError, match="already exists.*overwrite=True"):
        store.upload(str(src), "in/")
    (src / "a.txt").write_text("a2")
    store.upload_files([src / "a.txt"], target_path="in/", overwrite=True)

    # download copies every file under a path
    got = backend.download("in", tmp_path / "got")
    assert sorted(p.relative_to(tmp_path / "got").as_posix() for p in got) == [
        "a.txt",
        "sub/b.txt",
    ]
    assert (tmp_path / "got" / "a.txt").read_text() == "a2"
    with pytest.raises(ConfigError, match="exists; pass overwrite=True"):
        backend.download("in", tmp_path / "got")

    # redaction: no credential survives, in text or in the repr
    secrets = [str(v) for k, v in store.storage_options.items() if k != "account_name"]
    for secret in secrets:
        assert secret not in backend.redact(f"error with {secret}")
        assert secret not in repr(store)
    assert backend.redact("nothing secret") == "nothing secret"
    expected = LocalFolder if store.kind == "local" else AzureBlobContainer
    assert isinstance(backend, expected)


def test_unreachable_endpoint_is_a_storage_timeout_naming_the_datastore(
    tmp_path: Path,
) -> None:
    # a closed port: the Azure SDK would retry for minutes without the bound
    port = free_port()
    script = textwrap.dedent(
        f"""
        import json, time
        import daskrun
        ws = daskrun.Workspace.create({str(tmp_path / "ws")!r})
        store = daskrun.Datastore.register_azure_blob_container(
            ws, "deadstore", "sampledata", "devstoreaccount1",
            account_key={BAD_KEY!r},
            endpoint="http://127.0.0.1:{port}/devstoreaccount1")
        start = time.monotonic()
        try:
            store.upload_files([{__file__!r}], target_path="x/")
        except daskrun.StorageError as e:
            print(json.dumps({{
                "types": [c.__name__ for c in type(e).__mro__],
                "message": str(e), "datastore": e.datastore,
                "seconds": time.monotonic() - start}}))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), DASK_DASKRUN__STORAGE_TIMEOUT="2")
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "StorageTimeoutError" in found["types"]
    assert "TimeoutError" in found["types"]
    assert found["datastore"] == "deadstore"
    assert "'deadstore'" in found["message"]
    assert "did not answer within 2 s" in found["message"]
    assert BAD_KEY not in found["message"]
    assert found["seconds"] < 15


def test_bad_key_is_a_storage_error_without_the_key(
    azurite: str, tmp_path: Path
) -> None:
    ws = Workspace.create(tmp_path / "ws")
    store = Datastore.register_azure_blob_container(
        ws,
        "badkey",
        "sampledata",
        "devstoreaccount1",
        account_key=BAD_KEY,
        endpoint=_blob_endpoint(azurite),
    )
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(StorageError) as caught:
        store.upload_files([tmp_path / "a.txt"], target_path="x/")
    error = caught.value
    assert error.datastore == "badkey"
    assert error.action == "upload"
    assert "datastore 'badkey'" in str(error)
    assert BAD_KEY not in str(error)
    assert error.__cause__ is None and error.__suppress_context__
    with pytest.raises(StorageError, match="'badkey'") as caught:
        store.backend.download("x", tmp_path / "got")
    assert BAD_KEY not in str(caught.value)


def test_storage_errors_maps_once() -> None:
    options = {"account_key": "k3y=="}
    with pytest.raises(StorageError, match=r"^upload on datastore 'd' failed: "):
        with storage_errors("d", options, "upload"):
            raise OSError("key k3y== refused")
    # a builtin timeout becomes daskrun's, still a TimeoutError
    with pytest.raises(StorageTimeoutError, match="listing on datastore 'd'"):
        with storage_errors("d", options, "listing"):
            raise TimeoutError("no answer from k3y==")
    # daskrun's own errors pass unchanged
    with pytest.raises(ConfigError, match="^exists$"):
        with storage_errors("d", options, "upload"):
            raise ConfigError("exists")


def test_canceled_joins_the_tree_and_stays_importable_from_runner() -> None:
    assert daskrun.engine.runner.Canceled is Canceled
    assert issubclass(Canceled, daskrun.DaskRunError)
    assert issubclass(daskrun.RunTimeoutError, TimeoutError)
