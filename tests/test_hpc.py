"""HPC queues and secured clusters: a real single-node Slurm through
dask-jobqueue, TLS with certificates made here, GPU paths where a GPU is."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.config
import pytest
from distributed import Client, LocalCluster
from distributed.security import Security

from daskrun import (
    ComputeTarget,
    ConfigError,
    Dataset,
    ParallelRunConfig,
    ParallelRunStep,
    SlurmCompute,
    Workspace,
)

from .helpers import make_files, poll_for, require_module, write_script

JOB_SCRIPT = """
import os, time

def init():
    pass

def run(mini_batch):
    time.sleep(float(os.environ.get("SLEEP", "0")))
    out = []
    for p in mini_batch:
        if os.path.basename(p).startswith("bad"):
            raise ValueError("bad input")
        out.append(f"{os.path.basename(p)} {os.environ.get('SLURM_JOB_ID', '-')}")
    return out
"""


def _squeue() -> list[str]:
    done = subprocess.run(
        ["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True, check=True
    )
    return done.stdout.split("\n")[:-1]


def _wait_queue_empty(timeout: float = 20) -> None:
    poll_for(
        lambda: not _squeue(),
        timeout=timeout,
        interval=0.3,
        what=lambda: f"an empty queue; jobs left in squeue: {_squeue()}",
    )


def _slurm_cluster(tmp_path: Path, **kwargs: Any) -> Any:
    from dask_jobqueue import SLURMCluster

    options: dict[str, Any] = dict(
        cores=1,
        processes=1,
        memory="1GB",
        queue="debug",
        walltime="00:10:00",
        python=sys.executable,
        interface="lo",
        log_directory=str(tmp_path / "slurm-logs"),
        local_directory=str(tmp_path / "scratch"),
        scheduler_options={"dashboard_address": "127.0.0.1:0"},
        worker_extra_args=["--dashboard-address", "127.0.0.1:0"],
    )
    options.update(kwargs)
    return SLURMCluster(**options)


def _step(tmp_path: Path, compute_target: Any, **config: Any) -> ParallelRunStep:
    script = write_script(tmp_path, JOB_SCRIPT)
    config.setdefault("node_count", 2)
    config.setdefault("process_count_per_node", 1)
    return ParallelRunStep(
        "on-slurm",
        ParallelRunConfig(
            str(script), mini_batch_size=5, compute_target=compute_target, **config
        ),
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    )


def test_two_slurm_jobs_exactly_once(tmp_path: Path, slurm: dict[str, str]) -> None:
    require_module("dask_jobqueue", "pip install 'daskrun[jobqueue]'")
    files = make_files(tmp_path / "in", 60)
    with _slurm_cluster(tmp_path) as cluster:
        run = _step(tmp_path, cluster).run()
        assert run.status == "Completed", run.error
        lines = Path(run.output_path or "").read_text().splitlines()
        assert [line.split()[0] for line in lines] == [p.name for p in files]
        jobs = {line.split()[1] for line in lines}
        assert len(jobs) == 2 and "-" not in jobs  # two Slurm jobs did the work
        _wait_queue_empty()  # scaled back to zero: the jobs were cancelled


def test_registered_slurm_target_fails_threshold_and_cleans_up(
    tmp_path: Path, slurm: dict[str, str]
) -> None:
    require_module("dask_jobqueue", "pip install 'daskrun[jobqueue]'")
    make_files(tmp_path / "in", 20)
    make_files(tmp_path / "in", 5, prefix="bad")
    ws = Workspace.create(tmp_path / "ws")
    target = ComputeTarget.create(
        ws,
        "hpc",
        SlurmCompute.provisioning_configuration(
            queue="debug",
            cores=1,
            memory="1GB",
            walltime="00:10:00",
            interface="lo",
            log_directory=str(tmp_path / "slurm-logs"),
        ),
    )
    run = _step(tmp_path, ws.compute_targets["hpc"], run_max_try=1).run(workspace=ws)
    assert target.kind == "slurm"
    assert run.status == "Failed" and "error_threshold" in (run.error or "")
    assert "ValueError: bad input" in (run.error or "")
    _wait_queue_empty()


def test_wrong_queue_fails_at_once(tmp_path: Path, slurm: dict[str, str]) -> None:
    require_module("dask_jobqueue", "pip install 'daskrun[jobqueue]'")
    make_files(tmp_path / "in", 3)
    cluster = _slurm_cluster(tmp_path, queue="nonexistent")
    try:
        started = time.monotonic()
        with pytest.raises(
            ConfigError, match="invalid partition specified: nonexistent"
        ):
            _step(tmp_path, cluster).run()
        assert time.monotonic() - started < 15
    finally:
        cluster.close()
    _wait_queue_empty()


def test_jobs_that_do_not_start_time_out(tmp_path: Path, slurm: dict[str, str]) -> None:
    require_module("dask_jobqueue", "pip install 'daskrun[jobqueue]'")
    make_files(tmp_path / "in", 3)
    # a job holding every CPU of the node keeps ours pending
    hold = subprocess.run(
        ["sbatch", "--parsable", "-c", "4", "-o", "/dev/null", "--wrap", "sleep 600"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        with (
            _slurm_cluster(tmp_path) as cluster,
            dask.config.set({"daskrun.jobqueue.start-timeout": 8}),
        ):
            started = time.monotonic()
            run = _step(tmp_path, cluster).run()
            assert time.monotonic() - started < 40
        assert run.status == "Failed"
        assert "0 of 2 Slurm jobs started after 8 s" in (run.error or "")
        assert "squeue" in (run.error or "")
    finally:
        subprocess.run(["scancel", hold], check=False)
    _wait_queue_empty()


@pytest.mark.slow
def test_walltime_too_short_fails_instead_of_hanging(
    tmp_path: Path, slurm: dict[str, str]
) -> None:
    require_module("dask_jobqueue", "pip install 'daskrun[jobqueue]'")
    make_files(tmp_path / "in", 200)
    os.environ["SLEEP"] = "5"  # 40 mini-batches × 5 s on 2 workers: 100 s
    try:
        # Slurm rounds walltimes up to whole minutes: the jobs end after
        # 60-90 s, before the work is done
        with (
            _slurm_cluster(tmp_path, walltime="00:00:30") as cluster,
            dask.config.set({"daskrun.jobqueue.start-timeout": 10}),
        ):
            started = time.monotonic()
            run = _step(tmp_path, cluster, run_invocation_timeout=30).run()
            took = time.monotonic() - started
    finally:
        del os.environ["SLEEP"]
    assert run.status == "Failed"
    assert "walltime=00:00:30" in (run.error or "") and "resume" in (run.error or "")
    assert took < 150
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()
    _wait_queue_empty()


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate it signs for 127.0.0.1, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    ca_key, ca, key, csr, cert = (
        folder / n for n in ("ca.key", "ca.pem", "node.key", "node.csr", "node.pem")
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=daskrun-test-ca",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return ca, cert, key


def test_tls_cluster(
    tmp_path: Path, local_cluster: Callable[..., LocalCluster]
) -> None:
    ca, cert, key = _certificates(tmp_path)
    security = Security(
        tls_ca_file=str(ca),
        tls_client_cert=str(cert),
        tls_client_key=str(key),
        tls_scheduler_cert=str(cert),
        tls_scheduler_key=str(key),
        tls_worker_cert=str(cert),
        tls_worker_key=str(key),
        require_encryption=True,
    )
    files = make_files(tmp_path / "in", 12)
    with local_cluster(protocol="tls://", security=security) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        run = _step(
            tmp_path,
            address,
            node_count=1,
            process_count_per_node=None,
            security=security,
        ).run()
        assert run.status == "Completed", run.error
        lines = Path(run.output_path or "").read_text().splitlines()
        assert [line.split()[0] for line in lines] == [p.name for p in files]
        with pytest.raises((OSError, TimeoutError, TypeError)):
            Client(address, timeout=3, set_as_default=False)  # no certificates
        # free the failed client here: freed by the collector in the loop
        # thread of the next client, it deadlocks distributed's loop runners
        gc.collect()
        (tmp_path / "other").mkdir()
        other_ca, other_cert, other_key = _certificates(tmp_path / "other")
        stranger = Security(
            tls_ca_file=str(other_ca),
            tls_client_cert=str(other_cert),
            tls_client_key=str(other_key),
            require_encryption=True,
        )
        with pytest.raises((OSError, TimeoutError)):
            Client(address, timeout=3, security=stranger, set_as_default=False)
        gc.collect()
        with pytest.raises(ConfigError, match="cannot be reached"):
            _step(
                tmp_path,
                address,
                node_count=1,
                process_count_per_node=None,
                security=stranger,
            ).run()
        with pytest.raises(ConfigError, match="is a TLS scheduler; pass its"):
            _step(tmp_path, address, node_count=1, process_count_per_node=None).run()


def _gpus() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return done.stdout.count("GPU ") if done.returncode == 0 else 0


@pytest.mark.skipif(_gpus() == 0, reason="no NVIDIA GPU on this machine (nvidia-smi)")
def test_one_worker_per_gpu(tmp_path: Path) -> None:
    dask_cuda = require_module("dask_cuda", "pip install 'daskrun[cuda]'")
    make_files(tmp_path / "in", 20)
    script = write_script(
        tmp_path,
        """
        import os
        from daskrun import EntryScript
        def init():
            pass
        def run(mini_batch):
            return [f"{os.path.basename(p)} {EntryScript().agent_name} "
                    f"{os.environ['CUDA_VISIBLE_DEVICES'].split(',')[0]}"
                    for p in mini_batch]
        """,
    )
    with dask_cuda.LocalCUDACluster(
        threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as cluster:
        run = ParallelRunStep(
            "on-gpus",
            ParallelRunConfig(str(script), mini_batch_size=2, compute_target=cluster),
            inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
            output=str(tmp_path / "out"),
        ).run()
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    devices = {line.split()[2] for line in lines}
    assert len(devices) == min(_gpus(), 10)  # each worker pinned to its own GPU
    assert all("gpu" in line.split()[1] for line in lines)
