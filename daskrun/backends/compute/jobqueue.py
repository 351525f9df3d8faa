"""HPC queues through dask-jobqueue: Slurm first, PBS and SGE alike (LSF too).

A step on a ``JobQueueCluster`` (given as ``compute_target``, or made from a
registered ``SlurmCompute`` target) asks for ``node_count`` batch jobs, each
running ``process_count_per_node`` worker processes. daskrun

- checks the job script with the queue first (``sbatch --test-only`` on
  Slurm), so a wrong partition or an impossible request fails at once with
  the queue's own words,
- waits for the workers at most ``start_timeout`` seconds and then says how
  many jobs started ("1 of 2 Slurm jobs started after 120 s: check squeue"),
- watches the jobs while the step runs: when every worker is gone for
  ``start_timeout`` seconds (jobs ended by their walltime, or cancelled) the
  step fails with that reason instead of waiting forever,
- scales the cluster back to zero jobs when the step ends, however it ends.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from distributed import Client

from daskrun.engine.config import config_get
from daskrun.exceptions import ConfigError, JobFailedError

logger = logging.getLogger("daskrun")


def is_jobqueue_cluster(obj: Any) -> bool:
    # a cluster of dask-jobqueue's means it is imported already; importing it
    # here would install its SIGINT handler, which fails off the main thread
    core = sys.modules.get("dask_jobqueue.core")
    return core is not None and isinstance(obj, core.JobQueueCluster)


# the command that lists a queue's jobs, by queue name (PBS, SGE, ...: qstat)
_STATUS_COMMAND = {"Slurm": "squeue", "LSF": "bjobs", "HTCondor": "condor_q"}


def _queue_name(cluster: Any) -> str:
    name = type(cluster).__name__.replace("Cluster", "")
    return {"SLURM": "Slurm"}.get(name, name)


def check_job_script(cluster: Any) -> None:
    """Ask Slurm whether it would accept the job script, submitting nothing."""
    if type(cluster).__name__ != "SLURMCluster" or shutil.which("sbatch") is None:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as script:
        script.write(cluster.job_script())
        script.flush()
        done = subprocess.run(
            ["sbatch", "--test-only", script.name],
            capture_output=True,
            text=True,
            timeout=60,
        )
    if done.returncode != 0:
        reason = " ".join(
            line.strip()
            for line in done.stderr.splitlines()
            if "error" in line or "failure" in line
        )
        raise ConfigError(
            f"Slurm refuses the worker job ({reason or done.stderr.strip()}); check "
            "queue, cores, memory and walltime against 'sinfo' and "
            "'scontrol show partition'"
        )


def _live_workers(client: Client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def _started_jobs(cluster: Any) -> tuple[int, int]:
    """Jobs running and jobs submitted (running: as squeue says, on Slurm)."""
    ids = [
        job.job_id for job in cluster.workers.values() if getattr(job, "job_id", None)
    ]
    if not ids or type(cluster).__name__ != "SLURMCluster":
        return len(ids), len(ids)
    try:
        done = subprocess.run(
            ["squeue", "-h", "-o", "%T", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return len(ids), len(ids)
    return done.stdout.split().count("RUNNING"), len(ids)


@contextlib.contextmanager
def jobqueue_client(
    cluster: Any,
    node_count: int,
    process_count_per_node: int | None,
    start_timeout: float,
    close: bool = False,
) -> Iterator[Client]:
    """A client of ``cluster`` scaled to ``node_count`` jobs; scaled back to
    zero (or closed, with ``close``) afterwards."""
    per_job = int(cluster._dummy_job.worker_processes)
    if process_count_per_node is not None and process_count_per_node != per_job:
        raise ConfigError(
            f"process_count_per_node={process_count_per_node} but the cluster's jobs "
            f"run {per_job} worker processes each (processes={per_job}); make them "
            "equal, or leave process_count_per_node unset"
        )
    kind = _queue_name(cluster)
    check_job_script(cluster)
    client = Client(cluster, set_as_default=False)
    refused = SubmitErrors()
    try:
        cluster.scale(jobs=node_count)
        wanted = node_count * per_job
        deadline = time.monotonic() + start_timeout
        while _live_workers(client) < wanted:
            refused.check(kind, cluster)
            if time.monotonic() > deadline:
                running, submitted = _started_jobs(cluster)
                raise JobFailedError(
                    f"{running} of {node_count} {kind} jobs started after "
                    f"{start_timeout:g} s ({submitted} submitted, "
                    f"{_live_workers(client)} of {wanted} workers connected): check "
                    f"'{_STATUS_COMMAND.get(kind, 'qstat')}' and the jobs' logs; raise "
                    "daskrun.jobqueue.start-timeout if the queue is busy"
                )
            time.sleep(0.25)
        yield client
    finally:
        refused.close()
        with contextlib.suppress(Exception):
            cluster.scale(0)
        client.close()
        if close:
            _close(cluster)


class SubmitErrors(logging.Handler):
    """The errors of the queue's submit command (``qsub``, ``sbatch``...),
    which dask-jobqueue raises in the event loop, where tornado logs them:
    caught from its making until every job is submitted or it is closed, so
    a refused job fails the step at once, in the queue's words."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.refusals: list[str] = []
        self._logger = logging.getLogger("tornado.application")
        self._logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RuntimeError) and "non-zero exit code" in str(error):
            self.refusals.append(str(error))

    def check(self, kind: str, cluster: Any) -> None:
        """Raise a ConfigError when the queue refused a job; stop listening
        once every job has an id."""
        if self.refusals:
            self._logger.removeHandler(self)
            raise ConfigError(
                f"the {kind} queue refused the worker jobs ({_reason(self.refusals[0])}"
                "); check queue, cores, memory and walltime against the queue's "
                "settings"
            )
        jobs = list(cluster.workers.values())
        if jobs and all(getattr(job, "job_id", None) for job in jobs):
            self._logger.removeHandler(self)

    def close(self) -> None:
        self._logger.removeHandler(self)
        super().close()


def _reason(error: str) -> str:
    """The lines of a submit command's output that say what is wrong.

    >>> _reason("Command exited with non-zero exit code.\\nExit code: 1\\n"
    ...         "stdout:\\n\\nstderr:\\nqsub: Unknown queue\\n")
    'qsub: Unknown queue'
    """
    output = error.split("stdout:", 1)[-1].replace("stderr:", "")
    lines = [line.strip(" '") for line in output.splitlines() if line.strip(" '")]
    said = [line for line in lines if "error" in line.lower()] or lines
    return " ".join(dict.fromkeys(said)) or "no reason given"


def _close(cluster: Any) -> None:
    # jobs that were never submitted (sbatch failed) would make close() fail
    from distributed.core import Status

    for job in cluster.workers.values():
        if getattr(job, "job_id", None) is None:
            job.status = Status.failed
    with contextlib.suppress(Exception):
        cluster.close()


def job_walltime(header: str) -> str:
    """The walltime a job script's header asks for, in Slurm's, PBS's or
    Grid Engine's words ("?" where it asks for none).

    >>> job_walltime("#SBATCH -t 00:10:00")
    '00:10:00'
    >>> job_walltime("#PBS -l walltime=01:00:00"), job_walltime("#$ -l h_rt=02:00:00")
    ('01:00:00', '02:00:00')
    """
    found = re.search(r"(?:(?:-t|--time)[ =]|walltime=|h_rt=)(\S+)", header)
    return found.group(1) if found else "?"


class WorkerWatch:
    """Fails a running step whose workers are all gone for ``grace`` seconds
    (batch jobs ended by their walltime, or cancelled; a scheduler whose
    workers all left): ``on_lost(why)`` is called once, ``why`` from
    ``lost(grace)``."""

    def __init__(
        self,
        client: Client,
        grace: float,
        on_lost: Callable[[str], None],
        lost: Callable[[float], str],
    ):
        self.client = client
        self.grace = grace
        self.on_lost = on_lost
        self.lost = lost
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="daskrun-worker-watch", daemon=True
        )

    def __enter__(self) -> WorkerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        gone_since: float | None = None
        while not self._stop.wait(1.0):
            try:
                live = _live_workers(self.client)
            except Exception:  # the client is closing
                return
            if live:
                gone_since = None
                continue
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since >= self.grace:
                self.on_lost(self.lost(self.grace))
                return


@contextlib.contextmanager
def on_queue(
    cluster: Any,
    node_count: int,
    process_count_per_node: int | None,
    on_lost: Callable[[str], None] | None,
    close: bool,
) -> Iterator[Client]:
    """A client of ``cluster``'s batch jobs (see :func:`jobqueue_client`),
    watched while it is used when ``on_lost`` is given (see
    :class:`WorkerWatch`)."""
    timeout = float(config_get("jobqueue.start-timeout"))
    with jobqueue_client(
        cluster, node_count, process_count_per_node, timeout, close=close
    ) as client:
        if on_lost is None:
            yield client
            return
        walltime = job_walltime(cluster.job_header)
        with WorkerWatch(
            client, timeout, on_lost, lambda grace: _jobs_ended(grace, walltime)
        ):
            yield client


def _jobs_ended(grace: float, walltime: str) -> str:
    return (
        f"every worker of the step left and none came back within {grace:g} s "
        f"(walltime={walltime}); the batch jobs ended, e.g. their walltime ran "
        "out: raise walltime and resume the run (daskrun resume RUN_ID)"
    )
