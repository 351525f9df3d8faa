"""Inputs and outputs on remote storage: a real Azure Blob emulator (Azurite)."""

from __future__ import annotations

import http.server
import socket
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
from adlfs import AzureBlobFileSystem
from distributed import LocalCluster

from daskrun import Dataset, InputError, ParallelRunConfig, ParallelRunStep
from daskrun.registry.records import RunRecord

from .helpers import (
    daskrun,
    kill_client,
    make_files,
    run_step,
    start_daskrun,
    wait_for_blob_parts,
    write_script,
)
from .scripts import gated_script

CHECKING_SCRIPT = """
import http.server
import os

def init():
    pass

def run(mini_batch):
    out = []
    for p in mini_batch:
        assert os.path.isabs(p) and os.path.exists(p), p  # a local copy
        out.append(f"{os.path.basename(p)} {open(p).read()}")
    return out
"""


@pytest.fixture
def container(azurite: str) -> tuple[AzureBlobFileSystem, str]:
    fs = AzureBlobFileSystem(connection_string=azurite)
    name = f"c{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return fs, name


def test_blob_files_in_and_out(
    tmp_path: Path,
    cluster: LocalCluster,
    azurite: str,
    container: tuple[AzureBlobFileSystem, str],
) -> None:
    fs, name = container
    for i in range(23):
        fs.pipe_file(f"{name}/images/img{i:03d}.png", f"pixel{i}".encode())
        # same base name in another folder: each keeps its own copy
    fs.pipe_file(f"{name}/images/sub/img000.png", b"nested")
    options = {"connection_string": azurite}
    run = run_step(
        tmp_path,
        CHECKING_SCRIPT,
        Dataset.File.from_files(f"abfs://{name}/images", storage_options=options),
        output=f"abfs://{name}/out",
        step_options={"output_storage_options": options},
        mini_batch_size=5,
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error
    assert run.output_path == f"abfs://{name}/out/parallel_run_step.txt"
    lines = fs.cat_file(f"{name}/out/parallel_run_step.txt").decode().splitlines()
    assert lines == [f"img{i:03d}.png pixel{i}" for i in range(23)] + [
        "img000.png nested"
    ]
    # only the final file remains: parts are removed once it is published
    assert fs.find(f"{name}/out") == [f"{name}/out/parallel_run_step.txt"]
    assert (
        azurite.split("AccountKey=")[1].split(";")[0]
        not in (Path(run.logs_dir) / "job_result.txt").read_text()
    )


def test_blob_tabular_csv_split(
    tmp_path: Path,
    cluster: LocalCluster,
    azurite: str,
    container: tuple[AzureBlobFileSystem, str],
) -> None:
    fs, name = container
    frame = pd.DataFrame({"id": range(30_000), "v": range(30_000)})
    fs.pipe_file(f"{name}/t/a.csv", frame.to_csv(index=False).encode())
    options = {"connection_string": azurite}
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
    ds = Dataset.Tabular.from_delimited_files(
        f"abfs://{name}/t/*.csv", storage_options=options
    )
    run = ParallelRunStep("blob-csv", cfg, inputs=ds, output=str(tmp_path / "o")).run()
    assert run.status == "Completed", run.error
    out = pd.read_csv(run.output_path or "", sep=" ", header=None, names=["c", "id"])
    assert out["id"].tolist() == list(range(30_000))
    assert out["c"].nunique() == run.mini_batches_total > 5


def test_missing_blob_path_is_refused(
    azurite: str, container: tuple[AzureBlobFileSystem, str]
) -> None:
    _, name = container
    with pytest.raises(InputError, match=f"abfs://{name}/nothing/\\*.png"):
        Dataset.File.from_files(
            f"abfs://{name}/nothing/*.png",
            storage_options={"connection_string": azurite},
        )


def test_remote_side_input_is_fetched_to_each_worker(
    tmp_path: Path,
    cluster: LocalCluster,
    azurite: str,
    container: tuple[AzureBlobFileSystem, str],
) -> None:
    fs, name = container
    fs.pipe_file(f"{name}/model/weights.txt", b"3")
    fs.pipe_file(f"{name}/model/sub/bias.txt", b"4")
    options = {"connection_string": azurite}
    side = Dataset.File.from_files(f"abfs://{name}/model", storage_options=options)
    script = write_script(
        tmp_path,
        """
        import argparse, os
        def init():
            global w, b
            p = argparse.ArgumentParser()
            p.add_argument("--model")
            d = p.parse_known_args()[0].model
            w = int(open(os.path.join(d, "weights.txt")).read())
            b = int(open(os.path.join(d, "sub", "bias.txt")).read())
        def run(mb):
            return [w * int(open(p).read()) + b for p in mb]
        """,
    )
    (tmp_path / "in").mkdir()
    for i in range(6):
        (tmp_path / "in" / f"{i}.txt").write_text(str(i))
    cfg = ParallelRunConfig(
        str(script),
        output_action="append_row",
        compute_target=cluster,
        mini_batch_size=2,
    )
    run = ParallelRunStep(
        "remote-side",
        cfg,
        inputs=Dataset.File.from_files(str(tmp_path / "in")),
        output=str(tmp_path / "out"),
        side_inputs=[side],
        arguments=["--model", side],
    ).run()
    assert run.status == "Completed", run.error
    assert Path(run.output_path or "").read_text().split() == [
        str(3 * i + 4) for i in range(6)
    ]


def test_recursive_blob_globs_list_each_file_once(
    azurite: str, container: tuple[AzureBlobFileSystem, str]
) -> None:
    fs, name = container
    for rel in ("x.csv", "b/y.csv", "b/c/z.txt"):
        fs.pipe_file(f"{name}/data/{rel}", b"n\n1\n")
    options = {"connection_string": azurite}
    for pattern, count in (("data/**", 3), ("data/**/*.csv", 2)):
        ds = Dataset.File.from_files(
            f"abfs://{name}/{pattern}", storage_options=options
        )
        assert len(ds.files()) == len(set(ds.files())) == count, ds.files()


def test_unreachable_output_store_fails_within_the_storage_timeout(
    tmp_path: Path,
) -> None:
    # an Azure Blob endpoint on a closed port: the SDK would retry for 82 s
    # per call; the job fails within daskrun.storage-timeout, before any work
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = "c2VjcmV0LWtleS1uZXZlci1zaG93bg=="
    connection = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
        f"AccountKey={key};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("1")
    write_script(tmp_path, "def init(): pass\ndef run(mb): return mb\n")
    runs = tmp_path / "runs"
    started = time.monotonic()
    result = daskrun(
        *["run", "score.py", "--input", "in", "--output", "abfs://scores/out"],
        cwd=tmp_path,
        runs=runs,
        timeout=60,
        AZURE_STORAGE_CONNECTION_STRING=connection,
        DASK_DASKRUN__STORAGE_TIMEOUT="3",
    )
    assert time.monotonic() - started < 20
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "daskrun: error: creating the parts folder on output 'abfs://scores/out' did "
        "not answer within 3 s; check the output storage's endpoint, network and "
        "credentials (the bound is daskrun.storage-timeout)"
    ]
    assert key not in result.stderr
    assert not runs.exists()  # no run was started


def test_a_killed_run_with_blob_output_resumes_and_publishes(
    tmp_path: Path,
    runs_dir: Path,
    azurite: str,
    container: tuple[AzureBlobFileSystem, str],
) -> None:
    """The first resume of a client killed mid-run publishes: it lists the
    parts the killed attempt wrote as they are, not as a cache saw them."""
    fs, name = container
    files = make_files(tmp_path / "in", 40)
    write_script(tmp_path, gated_script(tmp_path / "go"))
    proc = start_daskrun(
        "run", "score.py", "--input", "in", "--output", f"abfs://{name}/out",
        "--mini-batch-size", "2", "--processes", "2", "-q",
        cwd=tmp_path, runs=runs_dir, AZURE_STORAGE_CONNECTION_STRING=azurite,
    )  # fmt: skip
    wait_for_blob_parts(fs, name, 3, proc)  # all but the gated mini-batch's group
    kill_client(proc)
    (tmp_path / "go").touch()
    (record,) = RunRecord.find(runs_dir)
    resumed = daskrun(
        "resume", record.run_id, "-q",
        cwd=tmp_path, runs=runs_dir, AZURE_STORAGE_CONNECTION_STRING=azurite,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    fs.invalidate_cache()
    lines = fs.cat_file(f"{name}/out/parallel_run_step.txt").decode().splitlines()
    assert lines == [p.name for p in files]


class _SasServer(http.server.BaseHTTPRequestHandler):
    """A CSV behind a URL whose SAS token the server rejects: on every
    request (``/expired``), or only on the ranged reads that cut it into
    mini-batches."""

    body = b"a,b\n" + b"".join(b"%d,%d\n" % (i, i) for i in range(5000))

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        refused = self.path.startswith("/expired") or (
            send_body and "Range" in self.headers
        )
        body = b"<Error><Code>AuthenticationFailed</Code></Error>"
        if not refused:
            body = self.body
        self.send_response(403 if refused else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("where", ["expired", "ranges"])
def test_an_http_input_s_error_is_one_line_without_its_sas(
    tmp_path: Path, runs_dir: Path, where: str
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SasServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "tJ8n2%2FqVw0kSecretSignature%3D"
    url = (
        f"http://127.0.0.1:{server.server_port}/{where}/t.csv"
        f"?sv=2022-11-02&se=2026-01-01&sp=r&sig={secret}"
    )
    write_script(tmp_path, "def init(): pass\ndef run(df): return df\n")
    try:
        result = daskrun(
            "run", "score.py", "--input", url, "--tabular", "--output", "out",
            "--mini-batch-size", "10KB", cwd=tmp_path, runs=runs_dir,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    what = "path" if where == "expired" else "file"  # not listed, or not read
    shown = url.replace(secret, "***")
    assert line.startswith(f"daskrun: error: input {what} {shown!r} "), line
    assert line.endswith("allow reading it" if what == "file" else "empty folder")
    assert "Signature" not in result.stderr + result.stdout
    assert not runs_dir.exists()  # no run was started
