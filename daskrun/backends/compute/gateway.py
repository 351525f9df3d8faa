"""Dask Gateway: a cluster asked of a gateway server for each step.

A step on a registered ``GatewayCompute`` target (or on a
``dask_gateway.GatewayCluster`` given as ``compute_target``) runs on
``node_count`` × ``process_count_per_node`` gateway workers (one per node
when ``process_count_per_node`` is unset). daskrun

- checks the cluster options against the gateway's own
  (``gateway.cluster_options()``) before it asks for a cluster, so an
  unknown option or a value out of range fails at once, naming it,
- scales the cluster to the step's workers, which the job then waits for
  within ``daskrun.workers-timeout`` (:mod:`daskrun.engine.preflight`),
- shuts the cluster down when the step ends, however it ends (an error,
  Ctrl-C), unless the target keeps it warm: then it is left running and the
  next step with the same options connects to it again; a
  ``GatewayCluster`` given by the user is scaled and left running.

The password (``auth="simple"``) or API token (``auth="jupyterhub"``) is
read from the environment variable the target names, when the step
connects: it is never stored in the workspace, and is hidden from every
message daskrun writes (:func:`daskrun.backends.storage.hide`).
"""

from __future__ import annotations

import base64
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from distributed import Client

from daskrun.backends.storage import hide
from daskrun.exceptions import ConfigError, JobFailedError


@dataclass(frozen=True)
class AuthKind:
    """A kind of gateway authentication: the environment variable that
    holds its secret by default (None: it has none), whether it takes a
    username, and how ``dask_gateway``'s auth object is made of them."""

    secret_env: str | None
    takes_username: bool
    make: Callable[[Any, str | None, str | None], Any]


AUTHS = {
    "simple": AuthKind(
        "DASK_GATEWAY_PASSWORD",
        True,
        lambda dg, user, secret: dg.BasicAuth(username=user, password=secret),
    ),
    "jupyterhub": AuthKind(
        "JUPYTERHUB_API_TOKEN",
        False,
        lambda dg, user, secret: dg.JupyterHubAuth(api_token=secret),
    ),
    # the ticket of 'kinit'
    "kerberos": AuthKind(None, False, lambda dg, user, secret: dg.KerberosAuth()),
}
"""The kinds of Dask Gateway authentication daskrun knows, by name."""


def is_gateway_cluster(obj: Any) -> bool:
    # a GatewayCluster means dask_gateway is imported already
    client = sys.modules.get("dask_gateway.client")
    return client is not None and isinstance(obj, client.GatewayCluster)


def check_auth(auth: object, username: str | None, secret_env: str | None) -> None:
    """A ConfigError naming ``auth`` where daskrun does not know it, or
    where it lacks what it needs.

    >>> check_auth("ldap", None, None)
    Traceback (most recent call last):
    ...
    daskrun.exceptions.ConfigError: auth='ldap' is not a kind of Dask Gateway \
authentication daskrun knows; use one of 'jupyterhub', 'kerberos', 'simple'
    """
    if not isinstance(auth, str) or auth not in AUTHS:
        raise ConfigError(
            f"auth={auth!r} is not a kind of Dask Gateway authentication daskrun "
            f"knows; use one of {', '.join(map(repr, sorted(AUTHS)))}"
        )
    if secret_env is not None and AUTHS[auth].secret_env is None:
        raise ConfigError(
            f"secret_env={secret_env!r} but auth={auth!r} takes no secret; leave "
            "secret_env unset (Kerberos uses the ticket of 'kinit')"
        )
    if username is not None and not AUTHS[auth].takes_username:
        raise ConfigError(
            f"username={username!r} but auth={auth!r} takes no username; leave "
            "it unset, or use auth='simple'"
        )


class GatewayAccess:
    """How to reach a gateway: its address, proxy and authentication, with
    the secret read from the environment when it is needed.

    Parameters
    ----------
    options : mapping
        ``address``, ``proxy_address``, ``auth``, ``username`` and
        ``secret_env`` of a registered target.
    """

    def __init__(self, options: Mapping[str, Any]):
        self.address: str = options["address"]
        self.proxy_address: str | None = options.get("proxy_address")
        self.auth: str = options.get("auth") or "simple"
        self.username: str | None = options.get("username")
        self.secret_env: str | None = (
            options.get("secret_env") or AUTHS[self.auth].secret_env
        )

    def secret(self) -> str | None:
        """The password or token, from the environment (None: not set)."""
        return os.environ.get(self.secret_env) if self.secret_env else None

    def hide(self, text: str) -> str:
        """``text`` without the secret, as given or as a Basic
        ``Authorization`` header carries it (base64 of ``user:password``)."""
        secret = self.secret()
        if not secret:
            return text
        basic = f"{self.username or _user()}:{secret}".encode()
        return hide(text, [secret, base64.b64encode(basic).decode()])

    def gateway(self) -> Any:
        """A ``dask_gateway.Gateway`` client of the server."""
        import dask_gateway

        kind = AUTHS[self.auth]
        user = (self.username or _user()) if kind.takes_username else None
        auth = kind.make(dask_gateway, user, self.secret())
        return dask_gateway.Gateway(
            self.address, proxy_address=self.proxy_address, auth=auth
        )


def _user() -> str:
    import getpass

    return getpass.getuser()


def cluster_options(gateway: Any, wanted: Mapping[str, Any], name: str) -> Any:
    """The gateway's cluster options with ``wanted`` set, or a ConfigError
    naming the option or value it refuses and the ones it offers."""
    options = gateway.cluster_options()
    for key, value in wanted.items():
        if key not in options:
            raise ConfigError(
                f"cluster_options has {key!r}, which the Dask Gateway of compute "
                f"target {name!r} does not offer (it offers: "
                f"{', '.join(sorted(options)) or 'none'}); remove it, or create "
                "the target again with GatewayCompute.provisioning_configuration("
                "cluster_options={...}) of those"
            )
        try:
            options[key] = value
        except Exception as e:  # traitlets' TraitError and the like
            raise ConfigError(
                f"cluster_options {key}={value!r} is refused by the Dask Gateway of "
                f"compute target {name!r} ({e}); use a value it accepts, e.g. "
                f"{key}={options[key]!r}"
            ) from None
    return options


@contextlib.contextmanager
def gateway_client(
    access: GatewayAccess,
    wanted: Mapping[str, Any],
    workers: int,
    name: str,
    keep_warm: bool = False,
) -> Iterator[Client]:
    """A client of a gateway cluster of ``workers`` workers, shut down after
    (or kept running with ``keep_warm``, and found again next time)."""
    with reaching(access, name):
        gateway = access.gateway()
    try:
        with reaching(access, name):
            options = cluster_options(gateway, wanted, name)
            cluster = _warm_cluster(gateway, options) if keep_warm else None
            if cluster is None:
                cluster = gateway.new_cluster(options, shutdown_on_close=not keep_warm)
        try:
            with reaching(access, name):
                cluster.scale(workers)
            with Client(cluster, set_as_default=False) as client:
                yield client
        finally:
            with contextlib.suppress(Exception):
                cluster.close(shutdown=not keep_warm)
            close_gateway(cluster.gateway)
    finally:
        close_gateway(gateway)


def close_gateway(gateway: Any) -> None:
    """Close a ``dask_gateway.Gateway`` client for good."""
    with contextlib.suppress(Exception):
        gateway.close()
    # its __del__ would close it again, and with distributed 2025's LoopRunner
    # the stopped loop raises there; it skips a client without a loop runner
    gateway.__dict__.pop("_loop_runner", None)


def _warm_cluster(gateway: Any, options: Any) -> Any:
    """A running cluster of this user's with the same options, if any."""
    wanted = dict(options)
    for report in gateway.list_clusters():
        if dict(report.options) == wanted:
            return gateway.connect(report.name, shutdown_on_close=False)
    return None


@contextlib.contextmanager
def reaching(access: GatewayAccess, name: str) -> Iterator[None]:
    """Errors of the gateway as daskrun's, naming the target and without
    the secret."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        message = access.hide(f"{type(e).__name__}: {e}")
        if getattr(e, "status", None) in (401, 403):  # aiohttp's error
            where = (
                f"the secret in ${access.secret_env}"
                if access.secret_env
                else "the Kerberos ticket ('klist')"
            )
            raise ConfigError(
                f"the Dask Gateway at {access.address} refuses compute target "
                f"{name!r} ({message}); check auth={access.auth!r} and {where}"
            ) from None
        raise JobFailedError(
            f"the Dask Gateway at {access.address} of compute target {name!r} "
            f"failed: {message}; check that it runs and that address and "
            "proxy_address are right"
        ) from None


@contextlib.contextmanager
def user_gateway_cluster(cluster: Any, workers: int) -> Iterator[Client]:
    """A client of a ``GatewayCluster`` the user made, scaled to ``workers``;
    left running (it is the user's)."""
    cluster.scale(workers)
    with Client(cluster, set_as_default=False) as client:
        yield client
