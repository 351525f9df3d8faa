"""S3 and GCS datastores against real API servers on 127.0.0.1: moto's
standalone server (S3) and gcp-storage-emulator (GCS), started by
``tests/conftest.py`` as Azurite is for Blob."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import dask.config
import pandas as pd
import pytest
from distributed import LocalCluster
from fsspec.core import url_to_fs

from daskrun import (
    Dataset,
    Datastore,
    ParallelRunConfig,
    ParallelRunStep,
    StorageError,
    StorageTimeoutError,
    Workspace,
)
from daskrun.backends.storage import redact, secret_values
from daskrun.exceptions import ConfigError
from daskrun.registry.datastores import BACKENDS, GCSBucket, S3Bucket
from daskrun.registry.records import RunRecord

from .helpers import (
    daskrun,
    kill_client,
    make_files,
    run_step,
    silent_server,
    start_daskrun,
    wait_for_blob_parts,
    write_script,
)
from .scripts import gated_script

# each file of a mini-batch is a local copy; its name and contents back
CHECKING_SCRIPT = """
import os

def init():
    pass

def run(mini_batch):
    out = []
    for p in mini_batch:
        assert os.path.isabs(p) and os.path.exists(p), p
        out.append(f"{os.path.basename(p)} {open(p).read()}")
    return out
"""
S3_KEY_ID = "AKIADASKRUNTEST"
S3_SECRET = "s3cr3t/KEY+never-shown=="
GCS_TOKEN = "ya29.a0-gcs-token-never-shown"


def _bucket() -> str:
    return f"b{uuid.uuid4().hex[:12]}"


def _s3(ws: Workspace, endpoint: str, name: str = "s3store") -> Datastore:
    return Datastore.register_s3_bucket(
        ws,
        name,
        _bucket(),
        access_key_id=S3_KEY_ID,
        secret_access_key=S3_SECRET,
        endpoint_url=endpoint,
        create_if_not_exists=True,
    )


def _gcs(ws: Workspace, endpoint: str, name: str = "gcsstore") -> Datastore:
    return Datastore.register_gcs_bucket(
        ws,
        name,
        _bucket(),
        project="test",
        token=GCS_TOKEN,
        endpoint_url=endpoint,
        create_if_not_exists=True,
    )


@pytest.fixture(params=["s3", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Datastore:
    ws = Workspace.create(tmp_path / "ws")
    if request.param == "s3":
        return _s3(ws, request.getfixturevalue("s3_server"))
    return _gcs(ws, request.getfixturevalue("gcs_server"))


def test_bucket_backend_contract(store: Datastore, tmp_path: Path) -> None:
    """tests/test_storage_backends.py's contract, on a bucket."""
    backend = store.backend
    assert BACKENDS[store.kind] is type(backend)
    assert isinstance(backend, {"s3": S3Bucket, "gcs": GCSBucket}[store.kind])
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    store.upload(str(src), "in/")
    assert backend.find("in") == ["in/a.txt", "in/sub/b.txt"]
    fs, path = url_to_fs(store.url("in/sub/b.txt"), **store.storage_options)
    assert fs.cat_file(path) == b"b"
    with pytest.raises(ConfigError, match="already exists.*overwrite=True"):
        store.upload(str(src), "in/")
    (src / "a.txt").write_text("a2")
    store.upload_files([src / "a.txt"], target_path="in/", overwrite=True)
    got = backend.download("in", tmp_path / "got")
    assert sorted(p.relative_to(tmp_path / "got").as_posix() for p in got) == [
        "a.txt",
        "sub/b.txt",
    ]
    assert (tmp_path / "got" / "a.txt").read_text() == "a2"
    with pytest.raises(ConfigError, match="exists; pass overwrite=True"):
        backend.download("in", tmp_path / "got")
    own = {"s3": S3_SECRET, "gcs": GCS_TOKEN}[store.kind]
    for secret in (own, *map(str, store.storage_options.values())):
        assert secret not in backend.redact(f"error with {secret}")
        assert secret not in repr(store)
    assert backend.redact("nothing secret") == "nothing secret"


def test_registration_keeps_the_secret_apart(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "ws")
    s3 = Datastore.register_s3_bucket(
        ws, "s3", "scores", S3_KEY_ID, S3_SECRET, None, "http://h:9000/", "eu-west-1"
    )
    gcs = Datastore.register_gcs_bucket(ws, "gcs", "scores", "p", GCS_TOKEN)
    assert isinstance(s3.backend, S3Bucket) and BACKENDS["s3"] is S3Bucket
    assert isinstance(gcs.backend, GCSBucket) and BACKENDS["gcs"] is GCSBucket
    assert s3.url("a/b.csv") == "s3://scores/a/b.csv"
    assert gcs.url("a/b.csv") == "gs://scores/a/b.csv"
    assert s3.storage_options == {
        "key": S3_KEY_ID,
        "secret": S3_SECRET,
        "endpoint_url": "http://h:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    assert gcs.storage_options == {"token": GCS_TOKEN, "project": "p"}
    assert repr(s3) == "Datastore(name='s3', kind='s3', bucket_name='scores')"
    # the credentials live in secrets/ alone, owner-only
    db = (ws.path / "workspace.db").read_bytes()
    assert S3_SECRET.encode() not in db and GCS_TOKEN.encode() not in db
    for name in ("s3", "gcs"):
        assert (ws.path / "secrets" / f"{name}.json").stat().st_mode & 0o777 == 0o600
    # a service account's key file is kept as JSON; "anon" is no secret
    key_file = tmp_path / "sa.json"
    account = {"type": "service_account", "private_key": "-----PRIVATE k3y-----"}
    key_file.write_text(json.dumps(account))
    sa = Datastore.register_gcs_bucket(ws, "sa", "scores", token=str(key_file))
    assert sa.storage_options["token"] == account
    anon = Datastore.register_gcs_bucket(ws, "anon", "scores", token="anon")
    assert anon.storage_options == {"token": "anon"}
    assert not (ws.path / "secrets" / "anon.json").exists()


def test_bad_registrations_show_the_fix(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "ws")
    with pytest.raises(ConfigError, match="bucket_name='Bad_Name' is not a valid"):
        Datastore.register_s3_bucket(ws, "x", "Bad_Name")
    with pytest.raises(ConfigError, match="access_key_id and secret_access_key"):
        Datastore.register_s3_bucket(ws, "x", "scores", access_key_id=S3_KEY_ID)
    with pytest.raises(ConfigError, match="endpoint_url='h:9000' is not a URL"):
        Datastore.register_gcs_bucket(ws, "x", "scores", endpoint_url="h:9000")


def test_s3_and_gcs_secrets_are_redacted() -> None:
    s3 = {"key": S3_KEY_ID, "secret": S3_SECRET, "token": "sess10n-t0ken"}
    s3["client_kwargs"] = {"region_name": "us-east-1"}  # type: ignore[assignment]
    assert sorted(secret_values(s3)) == sorted([S3_KEY_ID, S3_SECRET, "sess10n-t0ken"])
    text = f"denied: {S3_SECRET} / {S3_SECRET.replace('/', '%2F')} sess10n-t0ken"
    assert redact(text, s3) == "denied: *** / *** ***"
    assert redact("in us-east-1", s3) == "in us-east-1"  # a region is no secret
    account = {"type": "service_account", "private_key": "PRIVATE-k3y", "x": "y"}
    gcs = {"token": account, "project": "p1", "endpoint_url": "http://h"}
    assert sorted(secret_values(gcs)) == ["PRIVATE-k3y", "http://h", "p1", "y"]
    assert redact("a service_account: PRIVATE-k3y", gcs) == "a service_account: ***"
    assert secret_values({"token": "anon"}) == []


def test_files_in_and_out_of_a_bucket(
    store: Datastore, tmp_path: Path, cluster: LocalCluster
) -> None:
    fs, _ = store.backend.fs()
    root = store.backend.spec["bucket_name"] + "/"
    for i in range(13):
        fs.pipe_file(f"{root}images/img{i:03d}.png", f"pixel{i}".encode())
    fs.pipe_file(f"{root}images/sub/img000.png", b"nested")
    run = run_step(
        tmp_path,
        CHECKING_SCRIPT,
        Dataset.File.from_files(store.path("images")),
        output=store.url("out"),
        step_options={"output_storage_options": store.storage_options},
        mini_batch_size=5,
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error
    fs.invalidate_cache()
    lines = fs.cat_file(f"{root}out/parallel_run_step.txt").decode().splitlines()
    assert lines == [f"img{i:03d}.png pixel{i}" for i in range(13)] + [
        "img000.png nested"
    ]
    assert fs.find(f"{root}out") == [f"{root}out/parallel_run_step.txt"]
    logs = "".join(p.read_text() for p in Path(run.logs_dir).rglob("*.txt"))
    assert S3_SECRET not in logs and GCS_TOKEN not in logs


def test_s3_tabular_csv(s3_server: str, tmp_path: Path, cluster: LocalCluster) -> None:
    store = _s3(Workspace.create(tmp_path / "ws"), s3_server)
    fs, _ = store.backend.fs()
    root = store.backend.spec["bucket_name"] + "/"
    frame = pd.DataFrame({"id": range(20_000), "v": range(20_000)})
    fs.pipe_file(f"{root}t/a.csv", frame.to_csv(index=False).encode())
    script = write_script(
        tmp_path,
        "import uuid\ndef init(): pass\n"
        "def run(df):\n    return df.assign(c=uuid.uuid4().hex)[['c', 'id']]\n",
    )
    cfg = ParallelRunConfig(
        str(script),
        output_action="append_row",
        mini_batch_size="64KB",
        compute_target=cluster,
    )
    ds = Dataset.Tabular.from_delimited_files(store.path("t/*.csv"))
    run = ParallelRunStep("s3-csv", cfg, inputs=ds, output=str(tmp_path / "o")).run()
    assert run.status == "Completed", run.error
    out = pd.read_csv(run.output_path or "", sep=" ", header=None, names=["c", "id"])
    assert out["id"].tolist() == list(range(20_000))
    assert out["c"].nunique() == run.mini_batches_total > 3


def _aws_env(endpoint: str) -> dict[str, str]:
    """What the CLI (boto) reads to reach a bucket by its s3:// URL."""
    return {
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def test_a_killed_run_with_s3_output_resumes_exactly(
    s3_server: str, tmp_path: Path, runs_dir: Path
) -> None:
    store = _s3(Workspace.create(tmp_path / "ws"), s3_server)
    fs, _ = store.backend.fs()
    bucket = store.backend.spec["bucket_name"]
    files = make_files(tmp_path / "in", 40)
    write_script(tmp_path, gated_script(tmp_path / "go"))
    env = _aws_env(s3_server)
    proc = start_daskrun(
        "run", "score.py", "--input", "in", "--output", f"s3://{bucket}/out",
        "--mini-batch-size", "2", "--processes", "2", "-q",
        cwd=tmp_path, runs=runs_dir, **env,
    )  # fmt: skip
    wait_for_blob_parts(fs, bucket, 3, proc)  # all but the gated group
    kill_client(proc)
    (tmp_path / "go").touch()
    (record,) = RunRecord.find(runs_dir)
    resumed = daskrun("resume", record.run_id, "-q", cwd=tmp_path, runs=runs_dir, **env)
    assert resumed.returncode == 0, resumed.stderr
    fs.invalidate_cache()
    lines = fs.cat_file(f"{bucket}/out/parallel_run_step.txt").decode().splitlines()
    assert lines == [p.name for p in files]
    assert S3_SECRET not in resumed.stderr + resumed.stdout


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_stalled_bucket_fails_within_the_bound_without_its_secret(
    kind: str, tmp_path: Path
) -> None:
    ws = Workspace.create(tmp_path / "ws")
    with silent_server() as server:
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        store = Datastore.register_s3_bucket(
            ws, "st", "scores", S3_KEY_ID, S3_SECRET, endpoint_url=endpoint
        ) if kind == "s3" else Datastore.register_gcs_bucket(
            ws, "st", "scores", "p", GCS_TOKEN, endpoint_url=endpoint
        )  # fmt: skip
        started = time.monotonic()
        with pytest.raises(StorageTimeoutError) as caught:
            with dask.config.set({"daskrun.storage-timeout": 2}):
                store.backend.find("in")
        assert time.monotonic() - started < 10
    message = str(caught.value)
    assert message.startswith("listing 'in' on datastore 'st': ")
    assert "\n" not in message
    assert S3_SECRET not in message and GCS_TOKEN not in message


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_refusing_bucket_is_a_storage_error_without_its_secret(
    kind: str, tmp_path: Path
) -> None:
    ws = Workspace.create(tmp_path / "ws")
    with silent_server() as server:
        port = server.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"  # closed now: refused
    store = Datastore.register_s3_bucket(
        ws, "rf", "scores", S3_KEY_ID, S3_SECRET, endpoint_url=endpoint
    ) if kind == "s3" else Datastore.register_gcs_bucket(
        ws, "rf", "scores", "p", GCS_TOKEN, endpoint_url=endpoint
    )  # fmt: skip
    (tmp_path / "a.txt").write_text("a")
    started = time.monotonic()
    with dask.config.set({"daskrun.storage-timeout": 5}):
        with pytest.raises(StorageError) as caught:
            store.upload_files([tmp_path / "a.txt"], target_path="x/")
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "datastore 'rf'" in message and "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert S3_SECRET not in message and GCS_TOKEN not in message


def test_an_s3_output_on_a_stalled_server_fails_the_cli_in_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("1")
    write_script(tmp_path, "def init(): pass\ndef run(mb): return mb\n")
    runs = tmp_path / "runs"
    with silent_server() as server:
        env = _aws_env(f"http://127.0.0.1:{server.getsockname()[1]}")
        started = time.monotonic()
        result = daskrun(
            *["run", "score.py", "--input", "in", "--output", "s3://scores/out"],
            cwd=tmp_path,
            runs=runs,
            timeout=60,
            DASK_DASKRUN__STORAGE_TIMEOUT="3",
            **env,
        )
    assert time.monotonic() - started < 20
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "daskrun: error: creating the parts folder on output 's3://scores/out' did "
        "not answer within 3 s; check the output storage's endpoint, network and "
        "credentials (the bound is daskrun.storage-timeout)"
    ]
    assert S3_SECRET not in result.stderr
    assert not runs.exists()


def test_the_error_map_takes_botocore_and_google_errors() -> None:
    from botocore.exceptions import EndpointConnectionError
    from gcsfs.retry import HttpError
    from google.auth.exceptions import RefreshError

    from daskrun.backends.storage import storage_errors

    options = {"secret": S3_SECRET, "token": GCS_TOKEN}
    raised = [
        EndpointConnectionError(endpoint_url=f"http://h/?k={S3_SECRET}"),
        HttpError({"code": 403, "message": f"token {GCS_TOKEN} refused"}),
        RefreshError(f"cannot refresh {GCS_TOKEN}"),
    ]
    for error in raised:
        with pytest.raises(StorageError, match="^listing on datastore 'b' failed: "):
            with storage_errors("b", options, "listing"):
                raise error
    with pytest.raises(StorageError) as caught:
        with storage_errors("b", options, "listing"):
            raise raised[0]
    assert S3_SECRET not in str(caught.value)
    assert S3_SECRET.replace("/", "%2F") not in str(caught.value)


def test_a_file_input_on_a_stalled_bucket_fails_within_the_bound(
    tmp_path: Path,
) -> None:
    ws = Workspace.create(tmp_path / "ws")
    with silent_server() as server:
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        store = Datastore.register_s3_bucket(
            ws, "st", "scores", S3_KEY_ID, S3_SECRET, endpoint_url=endpoint
        )
        started = time.monotonic()
        with dask.config.set({"daskrun.storage-timeout": 2}):
            with pytest.raises(StorageTimeoutError) as caught:
                Dataset.File.from_files(store.path("in"))
        assert time.monotonic() - started < 10
    assert "\n" not in str(caught.value)
    assert S3_SECRET not in str(caught.value)
