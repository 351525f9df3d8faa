"""A scheduler the job does not own, reached by its address: asked who it
is before a client waits on it, and watched while the job runs, so that one
that died or froze fails the job with :class:`~daskrun.ClusterLostError`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from distributed import Client
from distributed.comm import connect as comm_connect
from distributed.security import Security

from daskrun.backends.compute.machine import connect_timeout
from daskrun.exceptions import (
    ClusterLostError,
    ConfigError,
    DaskRunError,
    JobFailedError,
)


@contextlib.contextmanager
def scheduler_client(address: str, security: Any = None) -> Iterator[Client]:
    if address.startswith("tls://") and security is None:
        raise ConfigError(
            f"compute_target={address!r} is a TLS scheduler; pass its certificates "
            "with ParallelRunConfig(security=distributed.security.Security(...))"
        )
    fix = "start a scheduler there, or use compute_target=None for a local cluster"
    try:
        client = answering_client(address, security)
    except TimeoutError as e:
        raise ConfigError(f"compute_target={address!r} {e}; {fix}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"compute_target={address!r} cannot be reached ({e}); {fix}"
        ) from None
    with client, lost_mid_job(client, address, security):
        yield client


def answering_client(address: str, security: Security | None = None) -> Client:
    """A client of the scheduler at ``address``, once it has answered.

    distributed bounds the connection's opening but not the handshake
    after it: a port that accepts connections and never answers (a frozen
    scheduler, something else listening) holds ``Client(...)`` for ever.
    So the scheduler is asked who it is first, within
    ``daskrun.connect-timeout`` seconds, and a silent one raises
    :class:`TimeoutError` saying so.
    """
    seconds = connect_timeout()
    outcome: list[BaseException | None] = []

    def probe() -> None:  # a loop of its own: the caller's may be running
        try:
            _ask_identity(address, security, seconds)
            outcome.append(None)
        except BaseException as e:  # raised below, in the caller's thread
            outcome.append(e)

    thread = threading.Thread(target=probe, name="daskrun-connect", daemon=True)
    thread.start()
    thread.join()
    error = outcome[0] if outcome else RuntimeError("the probe did not run")
    if isinstance(error, TimeoutError):
        raise TimeoutError(
            f"did not answer within daskrun.connect-timeout={seconds:g} s"
        ) from None
    if error is not None:
        raise error
    return Client(address, security=security, timeout=seconds, set_as_default=False)


def _ask_identity(address: str, security: Security | None, seconds: float) -> None:
    """Ask the scheduler at ``address`` who it is, on a connection of its
    own, in an event loop of its own; :class:`TimeoutError` if it has not
    answered within ``seconds``."""
    args = security.get_connection_args("client") if security is not None else {}

    async def ask() -> None:
        comm = await comm_connect(address, timeout=seconds, **args)
        try:
            await comm.write({"op": "identity", "reply": True})
            await comm.read()
        finally:
            comm.abort()

    asyncio.run(asyncio.wait_for(ask(), seconds))


class _SchedulerWatch:
    """Notices that the scheduler of a cluster the job does not own (the
    shared one, a scheduler address) died or froze while the job runs.

    A client notices a scheduler that died (its connection closes), but not
    one that froze (stopped, or stuck): the connection stays open, and the
    job would wait for results for ever. So a thread asks the scheduler
    who it is every second, on a connection of its own; one that has not
    answered within ``daskrun.connect-timeout`` seconds counts as lost, and
    the client's connection to it is dropped, which hands every pending
    task back to the job as lost at once. :meth:`lost` says whether either
    happened.
    """

    def __init__(self, client: Client, address: str, security: Any):
        self.client, self.address, self.security = client, address, security
        self._silent = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="daskrun-scheduler-watch", daemon=True
        )

    def __enter__(self) -> _SchedulerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def lost(self) -> bool:
        return self._silent or self.client.status != "running"

    def _watch(self) -> None:
        seconds = connect_timeout()
        while not self._stop.wait(1.0):
            if self.client.status != "running":
                return  # closing, or its connection closed: lost() says so
            try:
                _ask_identity(self.address, self.security, seconds)
            except Exception:
                if self._stop.is_set():
                    return
                self._silent = True
                if self.client.loop is not None:
                    self.client.loop.add_callback(_drop_scheduler, self.client)
                return


def _drop_scheduler(client: Client) -> None:
    """Close ``client``'s connection to its scheduler (in its event loop):
    distributed then cancels every future it holds, as on a connection
    that broke."""
    stream = client.scheduler_comm
    if stream is not None and stream.comm is not None:
        stream.comm.abort()


@contextlib.contextmanager
def lost_mid_job(client: Client, address: str, security: Any) -> Iterator[None]:
    """Turn whatever a job raises once the scheduler at ``address`` died or
    froze into one :class:`~daskrun.ClusterLostError`."""
    with _SchedulerWatch(client, address, security) as watch:
        try:
            yield
        except (Exception, asyncio.CancelledError) as e:
            if isinstance(e, DaskRunError) and not isinstance(e, JobFailedError):
                raise
            if isinstance(e, ClusterLostError) or not watch.lost():
                raise
            raise ClusterLostError(address) from None


def dashboard_link(client: Client) -> str | None:
    """The Dask dashboard's URL, if the scheduler serves one."""
    try:
        return client.dashboard_link
    except Exception:  # no dashboard (bokeh missing or disabled)
        return None
