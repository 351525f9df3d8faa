"""A compute target on a real Dask Gateway: ``dask-gateway-server`` started
on 127.0.0.1 with its local process backend (``UnsafeLocalBackend``: the
scheduler and workers are processes of this user) and simple password
authentication, as upstream's own tests run it."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daskrun import (
    ComputeTarget,
    Dataset,
    GatewayCompute,
    ParallelRunConfig,
    ParallelRunStep,
    Workspace,
)
from daskrun.backends.compute.gateway import GatewayAccess, close_gateway, reaching
from daskrun.exceptions import ConfigError, JobFailedError

from .helpers import free_port, make_files, poll_for, require_module, write_script
from .scripts import ECHO

PASSWORD = "gw-Pa55word-never-shown"

SERVER_CONFIG = """
import sys
from dask_gateway_server.options import Integer, Options

c.Gateway.address = "127.0.0.1:{api}"
c.Proxy.address = "127.0.0.1:{http}"
c.Proxy.tcp_address = "127.0.0.1:{tcp}"
c.Gateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.Gateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = {password!r}
c.Backend.cluster_options = Options(
    Integer("worker_cores", 1, min=1, max=2, label="Worker cores")
)
c.ClusterConfig.scheduler_cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
c.ClusterConfig.worker_cmd = [sys.executable, "-m", "distributed.cli.dask_worker"]
c.ClusterConfig.idle_timeout = 600
"""


@pytest.fixture(scope="session")
def gateway_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    """A dask-gateway-server for the session: its address and proxy."""
    require_module("dask_gateway", "pip install 'daskrun[test]'")
    require_module("dask_gateway_server", "pip install 'daskrun[test]'")
    folder = tmp_path_factory.mktemp("gateway")
    http, tcp = free_port(), free_port()
    config = folder / "config.py"
    config.write_text(
        SERVER_CONFIG.format(api=free_port(), http=http, tcp=tcp, password=PASSWORD)
    )
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        # the workers import this checkout's daskrun, with this interpreter
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(root), os.environ.get("PYTHONPATH")])
        ),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    server_bin = Path(sys.executable).parent / "dask-gateway-server"
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(
            [str(server_bin), "-f", str(config)],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    address = f"http://127.0.0.1:{http}"
    try:
        poll_for(lambda: _answers(f"{address}/api/health"), timeout=60)
        yield {"address": address, "proxy_address": f"gateway://127.0.0.1:{tcp}"}
    finally:
        server.terminate()  # stops the clusters it still runs
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DASK_GATEWAY_PASSWORD", PASSWORD)
    return PASSWORD


def _gateway(server: dict[str, str]) -> Any:
    import dask_gateway

    return dask_gateway.Gateway(
        server["address"],
        proxy_address=server["proxy_address"],
        auth=dask_gateway.BasicAuth("daskrun-test", PASSWORD),
    )


def _no_clusters_left(server: dict[str, str]) -> None:
    gateway = _gateway(server)
    try:
        poll_for(lambda: not gateway.list_clusters(), timeout=30)
    finally:
        close_gateway(gateway)


def _target(ws: Workspace, server: dict[str, str], **options: Any) -> ComputeTarget:
    return ComputeTarget.create(
        ws,
        "gateway",
        GatewayCompute.provisioning_configuration(
            server["address"],
            proxy_address=server["proxy_address"],
            username="daskrun-test",
            **options,
        ),
    )


def _step(
    tmp_path: Path, target: ComputeTarget, body: str = ECHO, **config: Any
) -> ParallelRunStep:
    script = write_script(tmp_path / "src", body)
    cfg = ParallelRunConfig(
        str(script),
        compute_target=target,
        node_count=2,
        mini_batch_size=3,
        output_action="append_row",
        **config,
    )
    return ParallelRunStep(
        "on-gateway",
        cfg,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    )


def _texts_under(*folders: Path) -> str:
    texts = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                texts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(texts)


def test_a_step_on_the_gateway_writes_exact_output_and_shuts_its_cluster_down(
    tmp_path: Path, gateway_server: dict[str, str], password: str, runs_dir: Path
) -> None:
    files = make_files(tmp_path / "in", 20)
    ws = Workspace.create(tmp_path / "ws")
    target = _target(ws, gateway_server, cluster_options={"worker_cores": 1})
    assert target.kind == "gateway"
    run = _step(tmp_path, ws.compute_targets["gateway"]).run(workspace=ws)
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert sorted(lines) == sorted(str(p) for p in files)  # each input once
    _no_clusters_left(gateway_server)
    # the password is in no record, log or registry row
    assert password not in _texts_under(runs_dir, tmp_path / "ws", tmp_path / "out")
    assert password not in repr(target.get_status().serialize())


def test_a_failed_step_shuts_its_gateway_cluster_down(
    tmp_path: Path, gateway_server: dict[str, str], password: str
) -> None:
    make_files(tmp_path / "in", 6)
    failing = (
        "def init():\n    pass\n\n"
        "def run(mini_batch):\n    raise ValueError('bad input')\n"
    )
    ws = Workspace.create(tmp_path / "ws")
    _target(ws, gateway_server)
    step = _step(tmp_path, ws.compute_targets["gateway"], failing, run_max_try=1)
    run = step.run(workspace=ws)
    assert run.status == "Failed"
    assert "ValueError: bad input" in (run.error or "")
    _no_clusters_left(gateway_server)


def test_a_user_gateway_cluster_is_scaled_and_left_running(
    tmp_path: Path, gateway_server: dict[str, str]
) -> None:
    files = make_files(tmp_path / "in", 8)
    gateway = _gateway(gateway_server)
    cluster = gateway.new_cluster()
    try:
        run = _step(tmp_path, cluster).run()  # type: ignore[arg-type]
        assert run.status == "Completed", run.error
        lines = Path(run.output_path or "").read_text().splitlines()
        assert sorted(lines) == sorted(str(p) for p in files)
        assert [c.name for c in gateway.list_clusters()] == [cluster.name]
    finally:
        cluster.shutdown()
        close_gateway(cluster.gateway)
        close_gateway(gateway)
    _no_clusters_left(gateway_server)


def test_kept_warm_the_cluster_serves_the_next_step(
    tmp_path: Path, gateway_server: dict[str, str], password: str
) -> None:
    files = make_files(tmp_path / "in", 6)
    ws = Workspace.create(tmp_path / "ws")
    _target(ws, gateway_server, keep_warm=True)
    gateway = _gateway(gateway_server)
    try:
        first = _step(tmp_path, ws.compute_targets["gateway"]).run(workspace=ws)
        assert first.status == "Completed", first.error
        warm = [c.name for c in gateway.list_clusters()]
        assert len(warm) == 1  # left running
        (tmp_path / "out").rename(tmp_path / "out-1")
        second = _step(tmp_path, ws.compute_targets["gateway"]).run(workspace=ws)
        assert second.status == "Completed", second.error
        assert [c.name for c in gateway.list_clusters()] == warm  # the same one
        lines = Path(second.output_path or "").read_text().splitlines()
        assert sorted(lines) == sorted(str(p) for p in files)
    finally:
        for report in gateway.list_clusters():
            gateway.stop_cluster(report.name)
        close_gateway(gateway)
    _no_clusters_left(gateway_server)


@pytest.mark.parametrize(
    ("options", "named", "fix"),
    [
        ({"worker_cores": 9}, "worker_cores=9", "worker_cores=1"),
        ({"gpus": 1}, "'gpus'", "it offers: worker_cores"),
    ],
)
def test_bad_cluster_options_fail_at_once_naming_them(
    tmp_path: Path,
    gateway_server: dict[str, str],
    password: str,
    options: dict[str, Any],
    named: str,
    fix: str,
) -> None:
    make_files(tmp_path / "in", 2)
    ws = Workspace.create(tmp_path / "ws")
    _target(ws, gateway_server, cluster_options=options)
    started = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        _step(tmp_path, ws.compute_targets["gateway"]).run(workspace=ws)
    assert named in str(refused.value) and fix in str(refused.value)
    assert time.monotonic() - started < 30
    _no_clusters_left(gateway_server)


def test_a_wrong_password_is_refused_and_never_shown(
    tmp_path: Path,
    gateway_server: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    runs_dir: Path,
) -> None:
    wrong = "wrong-Secret-4321"
    monkeypatch.setenv("GW_SECRET", wrong)
    make_files(tmp_path / "in", 2)
    ws = Workspace.create(tmp_path / "ws")
    _target(ws, gateway_server, secret_env="GW_SECRET")
    with pytest.raises(ConfigError) as refused:
        _step(tmp_path, ws.compute_targets["gateway"]).run(workspace=ws)
    message = str(refused.value)
    assert "refuses compute target 'gateway'" in message
    assert "$GW_SECRET" in message  # the fix: where the secret comes from
    assert wrong not in message
    assert wrong not in _texts_under(runs_dir, tmp_path / "ws")


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"auth": "ldap"}, "auth='ldap' is not a kind of Dask Gateway"),
        ({"auth": "kerberos", "secret_env": "X"}, "secret_env='X' but auth='kerberos'"),
        ({"cluster_options": [1]}, "cluster_options=[1] is not a dict"),
    ],
)
def test_bad_provisioning_options_are_refused(
    options: dict[str, Any], named: str
) -> None:
    require_module("dask_gateway", "pip install 'daskrun[gateway]'")
    with pytest.raises(ConfigError, match=re.escape(named)):
        GatewayCompute.provisioning_configuration("http://127.0.0.1:8000", **options)
    with pytest.raises(ConfigError, match="is not a Dask Gateway address"):
        GatewayCompute.provisioning_configuration("127.0.0.1:8000")


def test_the_secret_is_hidden_from_gateway_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway error that echoes the password, or the Basic header made of
    it, reaches the user without it."""
    monkeypatch.setenv("DASK_GATEWAY_PASSWORD", PASSWORD)
    access = GatewayAccess({"address": "http://gw:8000", "username": "me"})
    header = base64.b64encode(f"me:{PASSWORD}".encode()).decode()
    with pytest.raises(JobFailedError) as failed:
        with reaching(access, "gw"):
            raise OSError(f"echo {PASSWORD} Authorization: Basic {header}")
    message = str(failed.value)
    assert PASSWORD not in message and header not in message
    assert "echo *** Authorization: Basic ***" in message
    assert "compute target 'gw'" in message


def test_a_gateway_that_is_not_there_fails_naming_it(
    tmp_path: Path, password: str
) -> None:
    require_module("dask_gateway", "pip install 'daskrun[gateway]'")
    make_files(tmp_path / "in", 2)
    ws = Workspace.create(tmp_path / "ws")
    address = f"http://127.0.0.1:{free_port()}"
    _target(ws, {"address": address, "proxy_address": None})  # type: ignore[dict-item]
    started = time.monotonic()
    run = _step(tmp_path, ws.compute_targets["gateway"]).run(workspace=ws)
    assert run.status == "Failed"
    message = run.error or ""
    assert f"the Dask Gateway at {address} of compute target 'gateway'" in message
    assert "check that it runs" in message
    assert time.monotonic() - started < 30


def test_the_cluster_has_node_count_times_process_count_per_node_workers(
    tmp_path: Path, gateway_server: dict[str, str], password: str
) -> None:
    ws = Workspace.create(tmp_path / "ws")
    target = _target(ws, gateway_server)
    with target.connect(node_count=2, process_count_per_node=2) as client:
        client.wait_for_workers(4, timeout=120)
        time.sleep(1)  # none more comes
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 4
    _no_clusters_left(gateway_server)


CTRL_C_CLIENT = """
import sys
from pathlib import Path

from daskrun import (
    ComputeTarget, Dataset, GatewayCompute, ParallelRunConfig, ParallelRunStep,
    Workspace,
)

work, address, proxy = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
ws = Workspace.create(work / "ws")
ComputeTarget.create(ws, "gateway", GatewayCompute.provisioning_configuration(
    address, proxy_address=proxy, username="daskrun-test"))
cfg = ParallelRunConfig(
    str(work / "src" / "score.py"), compute_target=ws.compute_targets["gateway"],
    mini_batch_size=1, output_action="append_row")
step = ParallelRunStep("ctrl-c", cfg,
    inputs=[Dataset.File.from_files(str(work / "in"))], output=str(work / "out"))
step.run(workspace=ws)
"""

SLOW = """
import time
from pathlib import Path

def init():
    pass

def run(mini_batch):
    Path(MARK).touch()
    time.sleep(2)
    return mini_batch
"""


def test_ctrl_c_shuts_the_gateway_cluster_down(
    tmp_path: Path, gateway_server: dict[str, str], password: str
) -> None:
    make_files(tmp_path / "in", 30)
    mark = tmp_path / "started"
    write_script(tmp_path / "src", f"MARK = {str(mark)!r}\n{SLOW}")
    (tmp_path / "client.py").write_text(CTRL_C_CLIENT)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "HOME": str(tmp_path)}
    client = subprocess.Popen(
        [sys.executable, str(tmp_path / "client.py"), str(tmp_path),
         gateway_server["address"], gateway_server["proxy_address"]],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        poll_for(mark.exists, timeout=120, running=client)
        gateway = _gateway(gateway_server)
        try:
            assert len(gateway.list_clusters()) == 1  # the step's, running
        finally:
            close_gateway(gateway)
        client.send_signal(signal.SIGINT)  # Ctrl-C
        client.wait(60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode != 0
    _no_clusters_left(gateway_server)
