"""Before the first mini-batch: workers to run it, and data they can reach.

:func:`preflight` runs once per job, after the client connects and before
``init()``, in two steps:

1. **Workers.** A cluster with no worker yet (a scheduler whose workers are
   still queued, or never started) is waited for, showing ``waiting for
   workers (0/N)``, at most ``daskrun.workers-timeout`` seconds; then the
   job fails naming the scheduler.
2. **Hosts.** One worker per host other than the client's (workers grouped
   by host name and mount namespace: those that share a disk) reads a
   sample of the inputs and checks that the output's parts folder is the
   client's (it reads a token the client wrote there) and writable; where
   every worker is on the client's host, nothing more is asked. On a
   cluster whose workers do not
   see the client's disk, a local input fails the job at once, in one line
   naming the path, the host and the fixes, instead of every mini-batch
   failing its tries with ``FileNotFoundError``; an output folder the hosts
   do not share turns on ``daskrun.output.via-client``
   (:mod:`daskrun.engine.viaclient`) unless that is set to ``false``.

Nothing here plans or runs mini-batches; the job asks, and carries on with
the output target it is given back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from daskrun.backends.inputs.datasets import FileDataset, TabularDataset
from daskrun.backends.storage import (
    describe_error,
    map_errors,
    storage_failures,
    within,
)
from daskrun.engine.config import config_get, config_seconds
from daskrun.engine.output import OutputTarget
from daskrun.engine.viaclient import ViaClientTarget
from daskrun.exceptions import (
    ConfigError,
    DaskRunError,
    JobFailedError,
    UnreachableDataError,
)

logger = logging.getLogger("daskrun")

_SAMPLE = 3  # input files checked per data set: the first, a middle, the last
_TOKEN = ".preflight-{}.tmp"  # in the parts folder; no data set lists it


@dataclass(frozen=True)
class Sample:
    """An input file the hosts read, with the size the client listed."""

    path: str
    size: int
    local: bool
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Probe:
    """What each host checks; shipped to one worker per host."""

    samples: tuple[Sample, ...]
    output: OutputTarget | None  # None: the output is not the hosts' to write
    token: str
    timeout: float


@dataclass(frozen=True)
class Problem:
    """A path one host cannot reach, and why."""

    what: str  # "input" or "output"
    path: str
    host: str
    error: str
    local: bool = True  # on a file system, not a store reached by URL


def via_client_setting() -> bool | None:
    """``daskrun.output.via-client``: ``True``, ``False`` or ``None`` (on
    where the hosts do not share the output folder).

    >>> via_client_setting() is None
    True
    """
    value = config_get("output.via-client")
    if isinstance(value, str) and value.lower() in ("true", "false", "auto"):
        return None if value.lower() == "auto" else value.lower() == "true"
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(
        f"daskrun.output.via-client={value!r} is not true, false or null; use "
        'e.g. dask.config.set({"daskrun.output.via-client": True})'
    )


def workers_timeout(queued: bool) -> float | None:
    """``daskrun.workers-timeout`` in seconds; ``"auto"`` is 120 s, or no
    limit on a batch queue (``queued``), where jobs may wait for hours.

    >>> workers_timeout(False), workers_timeout(True)
    (120, None)
    """
    if config_get("workers-timeout") == "auto":
        return None if queued else 120
    return config_seconds("workers-timeout")


def samples(datasets: Sequence[Any]) -> tuple[Sample, ...]:
    """The first, a middle and the last file of each data set, with their
    sizes as the client sees them (a Dask collection has no files: Dask
    hands its partitions over)."""
    found: list[Sample] = []
    timeout = float(config_get("storage-timeout"))
    for ds in datasets:
        if not isinstance(ds, (FileDataset, TabularDataset)):
            continue
        files, local, options = ds.files(), ds.local, ds.storage_options
        for i in sorted({0, len(files) // 2, len(files) - 1}):
            size = _size(files[i], local, options, timeout)
            found.append(Sample(files[i], size, local, options))
    return tuple(found)


def _size(path: str, local: bool, options: Mapping[str, Any], timeout: float) -> int:
    if local:
        return os.path.getsize(path)
    from fsspec.core import url_to_fs

    fs, stripped = url_to_fs(path, **options)
    return int(within(timeout, lambda: fs.size(stripped)))


def preflight(
    client: Any,
    *,
    datasets: Sequence[Any],
    output: OutputTarget | None,
    expected_workers: int,
    queued: bool,
    say: Callable[[str], None],
    redact: Callable[[str], str],
    run_id: str,
    check: Callable[[], None] = lambda: None,
) -> OutputTarget | None:
    """Wait for workers, then check that every host reaches the data; the
    output target to use (``output``, or the same as a
    :class:`~daskrun.engine.viaclient.ViaClientTarget`). Raises
    :class:`UnreachableDataError` in one line where a host cannot read an
    input, or cannot write an output that via-client may not take over.
    ``check()`` is called while waiting: it raises to stop the job."""
    wait_for_workers(
        client, expected_workers, workers_timeout(queued), say, run_id, check
    )
    via = via_client_setting()
    if output is not None and via is True:
        output = ViaClientTarget.of(output)
    hosts = other_hosts(client)
    if not hosts:  # every worker sees the client's disk
        return output
    checked = output if output is not None and via is not True else None
    probe = Probe(
        samples(datasets),
        checked,
        uuid.uuid4().hex,
        float(config_get("storage-timeout")),
    )
    if checked is not None:
        _put_token(checked, probe.token)
    try:
        problems = check_hosts(client, probe, hosts)
    finally:
        if checked is not None:
            _remove_token(checked, probe.token)
    unread = [p for p in problems if p.what == "input"]
    if unread:
        raise _unreadable(unread[0], redact, run_id)
    unwritten = [p for p in problems if p.what == "output"]
    if not unwritten or output is None:
        return output
    return _write_elsewhere(output, unwritten[0], via, say, redact, run_id)


def _unreadable(
    p: Problem, redact: Callable[[str], str], run_id: str
) -> UnreachableDataError:
    """An input that host ``p.host`` cannot read, with the fix."""
    fixes = (
        "the workers there do not see it as the client does; put the "
        "inputs on a datastore (an abfs:// or s3:// URL, or "
        "Datastore.register_azure_blob_container), or on a shared file "
        "system mounted at the same path on every host"
        if p.local
        else "the workers there cannot reach that storage as the client "
        "does; give the data set its storage_options (credentials in the "
        "client's environment, such as AZURE_STORAGE_CONNECTION_STRING, "
        "stay on the client), or use a registered datastore"
    )
    return UnreachableDataError(
        redact(f"input {p.path} cannot be read on host {p.host} ({p.error}): " + fixes),
        path=p.path,
        host=p.host,
        run_id=run_id,
    )


def _write_elsewhere(
    output: OutputTarget,
    p: Problem,
    via: bool | None,
    say: Callable[[str], None],
    redact: Callable[[str], str],
    run_id: str,
) -> OutputTarget:
    """The client writes an output that host ``p.host`` cannot, where
    allowed; else :class:`UnreachableDataError`."""
    if via is False or not output.local:
        raise UnreachableDataError(
            redact(
                f"output {output.url} cannot be written on host {p.host} "
                f"({p.error}); put the output on a datastore, or on a shared "
                "file system mounted at the same path on every host, or let the "
                "client write it: daskrun.output.via-client: true"
            ),
            path=output.url,
            host=p.host,
            run_id=run_id,
        )
    say(
        f"daskrun: output {output.url} is on the client's disk (host {p.host} "
        "does not see it): results travel to the client, which writes them "
        "(daskrun.output.via-client)"
    )
    return ViaClientTarget.of(output)


def wait_for_workers(
    client: Any,
    expected: int,
    timeout: float | None,
    say: Callable[[str], None],
    run_id: str,
    check: Callable[[], None] = lambda: None,
) -> None:
    """Until the cluster has a worker, saying ``waiting for workers (0/N)``
    after a second and every 30 s; :class:`~daskrun.JobFailedError` after
    ``timeout`` seconds (``None``: no limit). ``check()`` may raise to stop
    waiting (the job was canceled, its batch jobs were lost)."""
    start = time.monotonic()
    said = -1.0
    address = getattr(client.scheduler, "address", "?")
    while not client.scheduler_info(n_workers=-1)["workers"]:
        check()
        waited = time.monotonic() - start
        if timeout is not None and waited > timeout:
            raise JobFailedError(
                f"no worker joined the scheduler at {address} within "
                f"{timeout:g} s (daskrun.workers-timeout); start workers for it "
                f"('dask worker {address}'), or raise daskrun.workers-timeout",
                run_id=run_id,
            )
        if waited >= 1 and (said < 0 or waited - said >= 30):
            bound = "no limit" if timeout is None else f"at most {timeout:g} s"
            say(
                f"daskrun: waiting for workers (0/{expected}) at {address}, "
                f"{waited:.0f} s so far ({bound}: daskrun.workers-timeout)"
            )
            said = waited
        time.sleep(0.2)


def other_hosts(client: Any) -> list[str]:
    """One worker's address per host other than the client's own (the same
    host name and mount namespace, as in daskrun's local cluster: workers
    there see the client's disk)."""
    chosen: dict[tuple[str, str], str] = {}
    own = _host()
    for address, key in sorted(client.run(_host, on_error="ignore").items()):
        if tuple(key) != own:
            chosen.setdefault(tuple(key), address)
    return list(chosen.values())


def check_hosts(client: Any, probe: Probe, hosts: Sequence[str]) -> list[Problem]:
    """Run ``probe`` on the workers at ``hosts``; what they could not reach.
    A worker that goes away during the check is skipped (the mini-batches
    will meet its host again)."""
    if not probe.samples and probe.output is None:
        return []
    # beside whatever the workers run (another client's tasks): not queued
    found = client.run(_check_soon, probe, workers=list(hosts), on_error="return")
    problems: list[Problem] = []
    for address, outcome in sorted(found.items()):
        if isinstance(outcome, BaseException):  # not the data's fault
            logger.info("preflight check skipped on %s: %r", address, outcome)
        else:
            problems += outcome
    return problems


async def _check_soon(probe: Probe) -> list[Problem]:
    """:func:`_check` in a thread of its own: the worker's event loop goes
    on (each storage call is bounded by ``probe.timeout``)."""
    return await asyncio.get_running_loop().run_in_executor(None, _check, probe)


def _host() -> tuple[str, str]:
    """This worker's host: its name and mount namespace (workers that share
    both share a disk)."""
    try:
        namespace = os.readlink("/proc/self/ns/mnt")
    except OSError:
        namespace = ""
    return socket.gethostname(), namespace


def _check(probe: Probe) -> list[Problem]:
    """On a worker: the sample inputs it cannot read, and the output folder
    if it is not the client's or not writable."""
    host = socket.gethostname()
    problems: list[Problem] = []
    for sample in probe.samples:
        error = _within(probe.timeout, functools.partial(_read, sample, probe.timeout))
        if error is not None:
            problems.append(Problem("input", sample.path, host, error, sample.local))
    target = probe.output
    if target is not None:
        error = _within(probe.timeout, lambda: _write(target, probe.token, host))
        if error is not None:
            problems.append(Problem("output", target.url, host, error))
    return problems


def _within(seconds: float, fn: Callable[[], str | None]) -> str | None:
    """``fn()``'s complaint, or the exception it raised, or a timeout, in
    words (credentials are hidden by the caller's redact)."""
    try:
        return within(seconds, fn)
    # read as it is raised: a library imported in the call is in the table
    # (TimeoutError is an OSError; within()'s own is a DaskRunError)
    except storage_failures(DaskRunError) as e:
        return f"{type(e).__name__}: {e}"


def _read(sample: Sample, timeout: float) -> str | None:
    """Read the first byte of ``sample``; a different size than the client
    listed means another file of the same name."""
    if sample.local:
        with open(sample.path, "rb") as f:
            f.read(1)
    else:
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(sample.path, **sample.storage_options)
        fs.cat_file(path, start=0, end=1)
    size = _size(sample.path, sample.local, sample.storage_options, timeout)
    if size != sample.size:
        return f"{size} bytes here, {sample.size} on the client: another file"
    return None


def _write(target: OutputTarget, token: str, host: str) -> str | None:
    """Whether the parts folder holds the client's token (the same folder)
    and takes a file; the file is removed."""
    fs = target.fs()
    url = f"{target.parts_url}/{_TOKEN.format(token)}"
    try:
        found = fs.cat_file(url).decode()
    except FileNotFoundError:
        found = None
    if found != token:
        return "not the client's folder: FileNotFoundError"
    mine = f"{target.parts_url}/{_TOKEN.format(f'{token}-{uuid.uuid4().hex}')}"
    fs.pipe_file(mine, host.encode())
    fs.rm_file(mine)
    return None


def _put_token(target: OutputTarget, token: str) -> None:
    fs = target.fs()
    url = f"{target.parts_url}/{_TOKEN.format(token)}"

    def unwritable(e: BaseException) -> JobFailedError:
        return JobFailedError(
            f"output {target.url!r} cannot be written: "
            f"{describe_error(e, target.storage_options)}"
        )

    # within()'s own StorageTimeoutError says it as well
    with map_errors(unwritable, own=unwritable):
        within(target.timeout or 60, lambda: fs.pipe_file(url, token.encode()))


def _remove_token(target: OutputTarget, token: str) -> None:
    fs = target.fs()
    url = f"{target.parts_url}/{_TOKEN.format(token)}"
    try:
        within(target.timeout or 60, lambda: fs.rm_file(url))
    except Exception as e:  # left behind: no data set lists it
        logger.info("could not remove %s: %r", url, e)
