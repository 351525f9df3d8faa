"""Whether the workers have a step's :class:`~daskrun.Environment`.

Checked twice: in this process before any cluster starts, where the
workers will run this interpreter (daskrun's own local cluster, a local or
``AmlCompute`` target), and on the workers once connected, which is what
counts on any other cluster. Two kinds of requirement go unmet:

- a package that is **not installed**: the entry script could not import
  it, so the step is refused (:class:`~daskrun.JobFailedError`), naming it
  and the ``pip install`` that fixes it;
- a **version pin** the installed version does not meet
  (``tensorflow==2.13.0`` where tensorflow-cpu 2.21 is installed), as Azure
  ML notebooks pin the images they build: one warning line names each
  package and both versions, and the step runs with what is installed.
  ``daskrun.environment.strict: true`` refuses it instead.

>>> check = PackageCheck(None, "run-1")
>>> check.here()  # no environment: nothing to check
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from daskrun.engine.config import config_bool
from daskrun.engine.environment import unmet_packages
from daskrun.exceptions import JobFailedError

logger = logging.getLogger("daskrun")

_NOT_INSTALLED = " not installed"  # how unmet_packages says a package is absent


def runs_here(compute_target: Any) -> bool:
    """Whether the workers of ``compute_target`` run this interpreter:
    daskrun's own local cluster (``None``), or a target that says so
    (a registered local or ``AmlCompute`` target's ``runs_here``)."""
    return compute_target is None or getattr(compute_target, "runs_here", False) is True


class PackageCheck:
    """The package check of one run; each unmet pin is warned about once.

    Parameters
    ----------
    environment : Environment or None
        The step's; ``None`` (or one without packages) checks nothing.
    run_id : str
        Named by the error that refuses the step.
    say : callable, optional
        Shows the warning line (the run's console, where it shows one: a
        pipeline's is replayed by ``wait_for_completion(show_output=True)``);
        by default it is logged on the ``daskrun`` logger.
    """

    def __init__(
        self,
        environment: Any,
        run_id: str,
        say: Callable[[str], None] | None = None,
    ):
        self.environment = environment
        self.run_id = run_id
        self.say = say or _log_warning
        self.requirements: list[str] = (
            list(environment.pip_packages) if environment is not None else []
        )
        self.strict = config_bool("environment.strict") if self.requirements else False
        self._warned: set[str] = set()

    def here(self) -> None:
        """Check this process's environment (before the cluster starts)."""
        if self.requirements:
            self._judge({"this machine": unmet_packages(self.requirements)})

    def on_workers(self, client: Any) -> None:
        """Check every worker of ``client``'s cluster (before ``init()``)."""
        if self.requirements:
            found = client.run(unmet_packages, self.requirements)
            self._judge({f"worker {w}": unmet for w, unmet in found.items()})

    def _judge(self, found: Mapping[str, Sequence[tuple[str, str]]]) -> None:
        """Refuse what is missing (every unmet requirement, when strict);
        warn once about each pin not met."""
        for where, unmet in sorted(found.items()):
            refused = [
                (problem, fix)
                for problem, fix in unmet
                if self.strict or problem.endswith(_NOT_INSTALLED)
            ]
            if refused:
                problems = "; ".join(problem for problem, _ in refused)
                fixes = " ".join(repr(fix) for _, fix in refused)
                raise JobFailedError(
                    f"Environment {self.environment.name!r}: {problems} on {where}; "
                    f"fix the workers' environment (pip install {fixes})",
                    run_id=self.run_id,
                )
        pins = sorted({p for unmet in found.values() for p, _ in unmet} - self._warned)
        if pins:
            self._warned.update(pins)
            self.say(
                f"daskrun: Environment {self.environment.name!r}: {'; '.join(pins)}; "
                "running with the installed versions (set "
                "daskrun.environment.strict: true to refuse the step instead)"
            )


def _log_warning(line: str) -> None:
    logger.warning("%s", line)
