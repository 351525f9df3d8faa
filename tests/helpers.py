"""Helpers shared by the tests and the scripts they run in subprocesses.

Fixtures live in ``conftest.py`` (``cluster``, ``local_cluster``, ``azurite``,
``hosts``, ``slurm``, ...), the entry scripts the tests run in
``tests/scripts.py``; everything here is plain and importable as
``tests.helpers`` (or ``from .helpers import ...`` inside the test package).

Wait with :func:`poll_for` (never a hand-written deadline loop): it names what
it awaited when it gives up, and fails at once where the process that should
bring it about has ended.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
import pytest
from distributed import Client, LocalCluster

from daskrun import (
    Dataset,
    DatasetConsumptionConfig,
    Datastore,
    Model,
    ParallelRunConfig,
    ParallelRunStep,
    Pipeline,
    PipelineData,
    PipelineParameter,
    StepRun,
    Workspace,
)
from daskrun.engine.output import OutputTarget, committed_parts

from .scripts import DIGIT_SCRIPT, VICTIM_SCRIPT

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")


def poll_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    *,
    what: str | Callable[[], str] | None = None,
    running: subprocess.Popen[Any] | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something
    truthy, and return that; fail after ``timeout`` s with a message naming
    ``what`` was awaited (by default the predicate's docstring or name; a
    callable ``what`` is called then, to say how far it got). With
    ``running``, fail at once, with its output, where that process has ended
    before the predicate held.

    >>> poll_for(lambda: 42, timeout=1)
    42
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if running is not None and running.poll() is not None:
            out, err = running.communicate()
            pytest.fail(
                f"{_awaited(predicate, what)}: the process ended first "
                f"(exit {running.returncode})\n{out}\n{err}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"{_awaited(predicate, what)}: not within {timeout} s")
        time.sleep(interval)


def _awaited(predicate: Callable[[], object], what: object) -> str:
    if callable(what):
        what = what()
    if what is None:
        what = (predicate.__doc__ or "").strip() or getattr(
            predicate, "__name__", repr(predicate)
        )
    return f"waiting for {what}"


def new_local_cluster(**settings: Any) -> LocalCluster:
    """A cluster of real worker processes on 127.0.0.1: two single-threaded
    workers and a local dashboard unless ``settings`` say otherwise (they are
    ``LocalCluster``'s keywords). The ``local_cluster`` fixture closes those
    a test leaves open."""
    defaults: dict[str, Any] = {
        "n_workers": 2,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }
    return LocalCluster(**{**defaults, **settings})


def wait_for_parts(out: Path, n: int, process: subprocess.Popen[str]) -> None:
    """Wait (up to 120 s) until ``n`` mini-batches are committed in output
    folder ``out`` by ``process``, which must still be running."""
    poll_for(
        lambda: len(committed(out)) >= n,
        timeout=120,
        what=lambda: f"{n} mini-batches committed in {out}, have {committed(out)}",
        running=process,
    )


def write_script(folder: Path, body: str, name: str = "score.py") -> Path:
    """Write an entry script (dedented) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def make_files(folder: Path, n: int, prefix: str = "f") -> list[Path]:
    """``n`` small text files whose content is their number."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i:05d}.txt"
        p.write_text(str(i))
        paths.append(p)
    return paths


def poison_files(folder: Path, n: int, poison: set[int]) -> list[str]:
    """``n`` files in name order, those at ``poison`` named ``...-poison``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"f{i:05d}{'-poison' if i in poison else ''}.txt"
        (folder / name).write_text(str(i))
        names.append(name)
    return names


def poison_rows(path: Path, n: int, poison: set[int]) -> pd.DataFrame:
    """``n`` rows ``id, v`` in ``path``, ``v`` negative at ``poison``."""
    import pandas as pd

    frame = pd.DataFrame(
        {"id": range(n), "v": [-1 if i in poison else i for i in range(n)]}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return frame


REPO = Path(__file__).resolve().parent.parent
AZURITE = REPO / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (public, not a secret)
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
    "KBHBeksoGMGw=="
)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def require_chromium() -> None:
    """Skip (fail under DASKRUN_REQUIRE_SERVICES=1) where Chromium is not
    installed."""
    if CHROMIUM is None:
        missing_service("Chromium", "run scripts/install (apt-get install chromium)")


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium, with no network beyond 127.0.0.1."""
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--proxy-server=127.0.0.1:9",  # anything not local fails
            "--proxy-bypass-list=127.0.0.1",
            "--virtual-time-budget=6000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def job_page(cluster: LocalCluster) -> tuple[str, str]:
    """The daskrun page of ``cluster``'s dashboard and its plots' URL, with
    the token daskrun prints in the page's link."""
    from daskrun.monitoring.dashboard import install_page

    with Client(cluster) as client:
        page = install_page(client, cluster.dashboard_link)
    assert page is not None and "?token=" in page, page
    return page, page.replace("/daskrun?", "/daskrun/plots?")


def job_plots(
    plots: str, run: str, ready: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The data of the dashboard's daskrun plots (URL ``plots``, see
    :func:`job_page`) once they show the job whose run id starts with ``run``
    and ``ready`` holds of them (a shared cluster's page shows earlier jobs
    until this one starts); fails after 60 s naming ``what``."""
    import json
    import urllib.request

    def shown() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(plots, timeout=10) as reply:
                data = json.loads(reply.read())
        except OSError:  # the page is not there yet
            return None
        if str(data.get("run_id")).startswith(run) and ready(data):
            return data  # type: ignore[no-any-return]
        return None

    return poll_for(shown, timeout=60, interval=0.3, what=what)


def committed(out: Path) -> set[int]:
    """The mini-batches whose rows are written (in parts of their own or in
    groups) in the parts folders of output folder ``out``."""
    found: set[int] = set()
    for parts in out.glob(".daskrun/*/parts"):
        target = OutputTarget(str(out), "unused", parts.parent.name)
        found.update(committed_parts(target))
    return found


def kill_client(proc: subprocess.Popen[str] | psutil.Process) -> None:
    """SIGKILL a client process (or a cluster's, such as ``daskrun cluster
    serve``), then wait for its worker processes to notice and stop (killing
    those that do not within 30 s): only then is what the run wrote settled."""
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    for child in alive:
        child.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_service(name: str, fix: str) -> None:
    """Skip with the reason, or fail where scripts/test requires services."""
    message = f"{name} is not installed: {fix}"
    if os.environ.get("DASKRUN_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require_module(name: str, fix: str) -> ModuleType:
    """Import ``name``, as :func:`pytest.importorskip` does, but fail instead of
    skipping where scripts/test requires every service
    (``DASKRUN_REQUIRE_SERVICES=1``)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_service(name, fix)
        raise  # unreachable: missing_service skips or fails


def run_step(
    tmp_path: Path,
    script_body: str,
    inputs: Any,
    *,
    name: str = "test-step",
    output: str | None = "out",
    step_options: dict[str, Any] | None = None,
    show_output: bool = False,
    **config: Any,
) -> StepRun:
    """Write the entry script, build config and step, run it, return the run.

    A relative ``output`` lands under ``tmp_path``; URLs are used as given.
    """
    script = write_script(tmp_path, script_body)
    config.setdefault("output_action", "append_row")
    cfg = ParallelRunConfig(str(script), **config)
    if output is not None and "://" not in output:
        output = str(tmp_path / output)
    step = ParallelRunStep(
        name, cfg, inputs=inputs, output=output, **(step_options or {})
    )
    return step.run(show_output=show_output)


def files_step(
    tmp_path: Path, name: str, config: ParallelRunConfig, output: str = "out"
) -> ParallelRunStep:
    """Step ``name`` over the files in ``tmp_path/in``, its output in
    ``tmp_path/<output>``."""
    return ParallelRunStep(
        name,
        config,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / output),
    )


def start_run(step: ParallelRunStep) -> tuple[threading.Thread, list[StepRun]]:
    """``step.run()`` in a thread of its own, started: the thread, and the
    list its run lands in."""
    runs: list[StepRun] = []
    job = threading.Thread(target=lambda: runs.append(step.run()))
    job.start()
    return job, runs


def daskrun(
    *args: str, cwd: Path, runs: Path, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the ``daskrun`` command in ``cwd``, with run folders in ``runs``
    and ``env`` added to its environment."""
    return subprocess.run(
        [sys.executable, "-m", "daskrun", *args],
        cwd=cwd,
        env=dict(os.environ, DASK_DASKRUN__RUNS_DIR=str(runs), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_daskrun(
    *args: str, cwd: Path, runs: Path, stdout: int = subprocess.PIPE, **env: str
) -> subprocess.Popen[str]:
    """Start the ``daskrun`` command in ``cwd``, as :func:`daskrun` runs it,
    with ``env`` added to its environment; its stderr piped (its stdout too,
    unless ``stdout`` says otherwise), as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "daskrun", *args],
        cwd=cwd,
        env=dict(os.environ, DASK_DASKRUN__RUNS_DIR=str(runs), **env),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_blob_parts(
    fs: Any, container: str, n: int, process: subprocess.Popen[str]
) -> None:
    """Wait (up to 120 s) until ``n`` files are under ``container/out/.daskrun``
    (the parts of a run whose output is ``abfs://container/out``) as the
    store has them, written by ``process``, which must still be running."""

    def parts() -> list[str]:
        fs.invalidate_cache()
        out = f"{container}/out"
        return fs.find(f"{out}/.daskrun") if fs.exists(out) else []  # type: ignore[no-any-return]

    poll_for(
        lambda: len(parts()) >= n,
        timeout=120,
        interval=0.2,
        what=lambda: f"{n} files in {container}/out/.daskrun, have {parts()}",
        running=process,
    )


@contextlib.contextmanager
def silent_server() -> Iterator[socket.socket]:
    """A TCP server on 127.0.0.1 that takes connections (the kernel
    completes them) and never answers; ``.getsockname()[1]`` is its port."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        listener.settimeout(0.5)
        yield listener


def free_port_pair() -> int:
    """A port P with P+1 free too (slurmctld and slurmd)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free ports in a row")


def make_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        p.write_text(str(i % 10))
        paths.append(p)
    return paths


def make_model(folder: Path, offset: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights.txt").write_text(str(offset))
    return folder


def digit_pipeline(
    ws: Workspace,
    tmp_path: Path,
    cluster: LocalCluster,
    inputs: Path,
    allow_reuse: bool = True,
    **config: object,
) -> tuple[Pipeline, ParallelRunStep]:
    if not (tmp_path / "src" / "digit_identification.py").exists():
        write_script(tmp_path / "src", DIGIT_SCRIPT, "digit_identification.py")
    if "mnist" not in ws.models:
        Model.register(ws, make_model(tmp_path / "models"), "mnist")
    store = Datastore.register_local(ws, "images", inputs, overwrite=True)
    param = PipelineParameter(
        "mnist_param", Dataset.File.from_files(store.path(""), validate=False)
    )
    cfg = ParallelRunConfig(
        source_directory=str(tmp_path / "src"),
        entry_script="digit_identification.py",
        mini_batch_size=PipelineParameter("batch_size_param", 5),
        output_action="append_row",
        compute_target=cluster,
        environment_variables={"INIT_MARKERS": str(tmp_path / "markers")},
        **config,  # type: ignore[arg-type]
    )
    (tmp_path / "markers").mkdir(exist_ok=True)
    step = ParallelRunStep(
        "predict",
        cfg,
        inputs=[DatasetConsumptionConfig("images", param)],
        output=PipelineData("inferences"),
        allow_reuse=allow_reuse,
    )
    return Pipeline(ws, [step]), step


def victim_script(marks: Path, victims: dict[str, int], seconds: float) -> str:
    """:data:`VICTIM_SCRIPT` for ``victims`` (first file name -> starts to
    wait in), its markers in ``marks`` (made here)."""
    marks.mkdir(parents=True, exist_ok=True)
    return VICTIM_SCRIPT.format(marks=str(marks), victims=victims, seconds=seconds)


@dataclass(frozen=True)
class Kill:
    """One SIGKILL: the victim, which of its starts, the worker process and
    the keys its worker held then (the victim's task alone, normally)."""

    name: str
    start: int
    pid: int
    address: str
    held: int


class VictimKiller:
    """SIGKILLs the worker process of each start of each victim of
    :data:`VICTIM_SCRIPT` while that victim waits in ``run()``: the kill lands
    while the mini-batch is in flight, never between mini-batches.

    Before each kill it waits (up to ``settle`` s) until the victim's worker
    holds no task but the victim's, so a kill costs only the victim. Use as a
    context manager; on exit it lets any victim still waiting go on (the test
    then fails on :meth:`check`), and stops.
    """

    def __init__(
        self,
        client: Client,
        marks: Path,
        victims: dict[str, int],
        deadline: float = 180,
        settle: float = 10,
    ):
        self.client = client
        self.marks = marks
        self.expected = [(n, i) for n, k in victims.items() for i in range(k)]
        self.deadline = time.monotonic() + deadline
        self.settle = settle
        self.kills: list[Kill] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> VictimKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        (self.marks / "release").touch()
        self._thread.join(30)

    def _main(self) -> None:
        try:
            left = list(self.expected)
            while left and not self._stop.is_set():
                if time.monotonic() > self.deadline:
                    raise TimeoutError(f"victims never started: {left}")
                for name, start in list(left):
                    mark = self.marks / f"{name}.{start}.pid"
                    if mark.exists():
                        self._kill(name, start, int(mark.read_text()))
                        left.remove((name, start))
                time.sleep(0.02)
        except BaseException as e:  # reported by check()
            self.error = e

    def _address(self, pid: int) -> str:
        while time.monotonic() < self.deadline:
            try:
                pids = self.client.run(os.getpid, on_error="ignore")
            except Exception:  # a worker is coming or going
                pids = {}
            for address, worker_pid in pids.items():
                if worker_pid == pid:
                    return str(address)
            time.sleep(0.05)
        raise TimeoutError(f"no worker has pid {pid}")

    def _kill(self, name: str, start: int, pid: int) -> None:
        address = self._address(pid)
        settled = time.monotonic() + self.settle
        while True:
            held = len(self.client.processing([address]).get(address, ()))
            if held <= 1 or time.monotonic() > settled:
                break
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        self.kills.append(Kill(name, start, pid, address, held))

    def check(self) -> list[Kill]:
        """The kills, all of them; raises what went wrong in the thread."""
        if self.error is not None:
            raise AssertionError(f"killer failed: {self.error!r}") from self.error
        done = [(k.name, k.start) for k in self.kills]
        assert sorted(done) == sorted(self.expected), (done, self.expected)
        return self.kills


def execute_notebook(nb: Any, cwd: Path, kernel: str) -> Any:
    """Run every cell of ``nb`` in ``kernel`` (see the ``kernel`` fixture),
    in ``cwd``; the notebook, with its outputs."""
    import nbclient

    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=240,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return nb


def cell_text(cell: Any) -> str:
    """What a notebook cell printed."""
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def readme_notebook_cell() -> str:
    """The Quick start's notebook cell, as README.md shows it."""
    readme = (REPO / "README.md").read_text()
    found = re.search(r"In a Jupyter notebook.*?```python\n(.*?)```", readme, re.S)
    assert found, "README.md's Quick start has no notebook cell"
    return found.group(1)


def quick_start_blocks() -> list[str]:
    """The Python blocks of README.md's Quick start, as written."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    assert '__main__":' not in re.sub(r"No `if __name__[^`]*` is needed", "", section)
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@contextlib.contextmanager
def stopped_when_marked(marker: Path, seconds: float = 30) -> Iterator[None]:
    """While in this block: once ``marker`` holds a process id (written by
    an entry script), stop that process (SIGSTOP), as a frozen machine or a
    system call holding the interpreter would, for ``seconds`` or until the
    block ends; then let it go on (SIGCONT)."""
    done = threading.Event()

    def freezer() -> None:
        while not marker.exists() and not done.is_set():
            time.sleep(0.02)
        if done.is_set():
            return
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            done.wait(seconds)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=freezer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)
