"""The Python environment a step's workers must have: :class:`Environment`
and Azure ML's :class:`CondaDependencies`, and which of their requirements
this process's environment does not meet (:func:`unmet_packages`).

daskrun installs nothing: workers run in their existing environment, and
:mod:`daskrun.engine.packages` checks these requirements against it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from daskrun.exceptions import ConfigError


class Environment:
    """The Python environment a step's workers must have.

    Parameters
    ----------
    name : str
    pip_packages : list of str, optional
        Requirements (``"pillow"``, ``"tensorflow-cpu>=2.16"``) checked on
        every worker before the job starts: daskrun runs in the workers'
        existing environment and reports what is missing instead of
        installing it.
    environment_variables : dict, optional
        Set on every worker before ``init()``.

    Attributes
    ----------
    python : PythonSection
        Azure ML's ``env.python``: the packages of
        ``env.python.conda_dependencies`` (a :class:`CondaDependencies`) are
        checked with ``pip_packages``.
    docker : DockerSection
        Azure ML's ``env.docker`` (``enabled``, ``base_image``): accepted
        and unused, as workers run in their existing environment.
    spark, databricks : SparkSection, DatabricksSection
        Azure ML's Spark and Databricks settings (``spark.precache_packages``,
        ``spark.packages``, ``databricks.pypi_libraries``, ...): accepted,
        kept, and of no effect locally.
    r : None
        Azure ML's R section (``None`` unless set): kept, of no effect.
    inferencing_stack_version : str or None
        Kept, of no effect: daskrun serves no web service.

    Examples
    --------
    >>> env = Environment("batch")
    >>> env.python.conda_dependencies = CondaDependencies.create(
    ...     pip_packages=["pillow", "azureml-core"])
    >>> env.pip_packages
    ['pillow']
    """

    def __init__(
        self,
        name: str,
        pip_packages: Sequence[str] | None = None,
        environment_variables: Mapping[str, str] | None = None,
    ):
        self.name = name
        self._pip_packages = _requirements("pip_packages", pip_packages or [])
        self.environment_variables = dict(environment_variables or {})
        self.python = PythonSection()
        self.docker = DockerSection()
        self.spark = SparkSection()
        self.databricks = DatabricksSection()
        self.r: Any = None
        self.inferencing_stack_version: str | None = None

    @property
    def pip_packages(self) -> list[str]:
        """What every worker must have: ``pip_packages`` and the packages of
        ``python.conda_dependencies``; Azure ML's own (``azureml-*``) are
        daskrun's to provide and are left out."""
        conda = self.python.conda_dependencies
        extra = [] if conda is None else conda.requirements()
        found = [
            *self._pip_packages,
            *(p for p in extra if p not in self._pip_packages),
        ]
        return [p for p in found if not _is_azureml(p)]

    @pip_packages.setter
    def pip_packages(self, value: Sequence[str]) -> None:
        self._pip_packages = _requirements("pip_packages", value)

    def __repr__(self) -> str:
        return f"Environment(name={self.name!r}, pip_packages={self.pip_packages!r})"


# Azure ML's base images, for env.docker.base_image: recorded, not pulled
DEFAULT_CPU_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04"
DEFAULT_GPU_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.1-cudnn8-ubuntu20.04"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _requirements(what: str, packages: Sequence[str]) -> list[str]:
    """``packages`` as a list, each checked to be a pip requirement."""
    from packaging.requirements import InvalidRequirement, Requirement

    if isinstance(packages, str):
        raise ConfigError(
            f"{what}={packages!r} is one string; pass a list, e.g. [{packages!r}]"
        )
    for package in packages:
        try:
            Requirement(package)
        except InvalidRequirement:
            raise ConfigError(
                f"{what} item {package!r} is not a requirement; use e.g. "
                "'pillow' or 'tensorflow-cpu>=2.16'"
            ) from None
    return list(packages)


def _is_azureml(requirement: str) -> bool:
    found = _NAME.match(requirement)
    return found is not None and found.group().lower().startswith("azureml")


class PythonSection:
    """Azure ML's ``Environment.python``: ``conda_dependencies`` is checked;
    ``user_managed_dependencies`` and ``interpreter_path`` are accepted and
    unused (workers run in their existing environment)."""

    def __init__(self) -> None:
        self.conda_dependencies: CondaDependencies | None = None
        self.user_managed_dependencies = False
        self.interpreter_path = "python"


class DockerSection:
    """Azure ML's ``Environment.docker``: accepted and unused."""

    def __init__(self) -> None:
        self.enabled = False
        self.base_image: str | None = DEFAULT_CPU_IMAGE
        self.base_dockerfile: str | None = None


class SparkSection:
    """Azure ML's ``Environment.spark``: accepted, kept, no effect locally
    (daskrun runs no Spark)."""

    def __init__(self) -> None:
        self.repositories: list[str] = []
        self.packages: list[Any] = []
        self.precache_packages = True


class DatabricksSection:
    """Azure ML's ``Environment.databricks``: accepted, kept, no effect
    locally (daskrun runs no Databricks cluster)."""

    def __init__(self) -> None:
        self.maven_libraries: list[Any] = []
        self.pypi_libraries: list[Any] = []
        self.rcran_libraries: list[Any] = []
        self.jar_libraries: list[Any] = []
        self.egg_libraries: list[Any] = []


class CondaDependencies:
    """Azure ML's package list of an :class:`Environment`; daskrun checks its
    packages on every worker, as ``Environment(pip_packages=...)``.

    Pip packages are checked by name and version; conda packages by name
    (conda's version syntax is not pip's; ``python`` and ``pip`` are left
    out). Channels and ``pip_indexurl`` are kept and unused: nothing is
    installed.

    >>> deps = CondaDependencies.create(pip_packages=["pillow"],
    ...                                 conda_packages=["numpy=1.26"])
    >>> deps.requirements()
    ['pillow', 'numpy']
    """

    def __init__(self, conda_dependencies_file_path: str | None = None, **_: Any):
        self._pip: list[str] = []
        self._conda: list[str] = []
        self.channels: list[str] = []
        self.pip_indexurl: str | None = None
        self.python_version: str | None = None
        if conda_dependencies_file_path is not None:
            self._load(conda_dependencies_file_path)

    @staticmethod
    def create(
        pip_indexurl: str | None = None,
        pip_packages: Sequence[str] | None = None,
        conda_packages: Sequence[str] | None = None,
        python_version: str | None = None,
        pin_sdk_version: bool = True,
    ) -> CondaDependencies:
        """A package list; ``python_version`` is recorded, not installed."""
        deps = CondaDependencies()
        deps.pip_indexurl = pip_indexurl
        deps.python_version = python_version
        for package in _requirements("pip_packages", pip_packages or []):
            deps.add_pip_package(package)
        for package in conda_packages or []:
            deps.add_conda_package(package)
        return deps

    def _load(self, path: str) -> None:
        try:
            with open(path) as f:
                spec = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(
                f"conda_dependencies_file_path={path!r} cannot be read ({e}); "
                "pass a conda environment file (name, channels, dependencies)"
            ) from None
        self.channels = list(spec.get("channels") or [])
        for dep in spec.get("dependencies") or []:
            if isinstance(dep, dict):
                for package in dep.get("pip") or []:
                    self.add_pip_package(package)
            else:
                self.add_conda_package(str(dep))

    def add_pip_package(self, pip_package: str) -> None:
        (package,) = _requirements("pip_packages", [pip_package])
        if package not in self._pip:
            self._pip.append(package)

    def add_conda_package(self, conda_package: str) -> None:
        if not isinstance(conda_package, str) or not _NAME.match(conda_package):
            raise ConfigError(
                f"conda_packages item {conda_package!r} is not a conda package; "
                "use e.g. 'numpy' or 'numpy=1.26'"
            )
        if conda_package not in self._conda:
            self._conda.append(conda_package)

    def add_channel(self, channel: str) -> None:
        if channel not in self.channels:
            self.channels.append(channel)

    @property
    def pip_packages(self) -> list[str]:
        return list(self._pip)

    @property
    def conda_packages(self) -> list[str]:
        return list(self._conda)

    def requirements(self) -> list[str]:
        """What the workers must have, as pip requirements."""
        names = [m.group() for m in map(_NAME.match, self._conda) if m is not None]
        conda = [n for n in names if n.lower() not in ("python", "pip")]
        return [*self._pip, *(n for n in conda if n not in self._pip)]

    def serialize_to_string(self) -> str:
        """The conda environment file these dependencies make."""
        deps: list[Any] = (
            [f"python={self.python_version}"] if self.python_version else []
        )
        deps += [*self._conda, "pip", {"pip": self._pip}]
        spec = {"name": "daskrun", "channels": self.channels, "dependencies": deps}
        return str(yaml.safe_dump(spec, sort_keys=False))

    def __repr__(self) -> str:
        return (
            f"CondaDependencies(pip_packages={self._pip!r}, "
            f"conda_packages={self._conda!r})"
        )


def missing_packages(requirements: Sequence[str]) -> list[str]:
    """The requirements not met by this process's environment, each with
    what was found (see :func:`unmet_packages`).

    >>> missing_packages(["dask", "surely-not-installed-pkg"])
    ['surely-not-installed-pkg not installed']
    """
    return [problem for problem, _ in unmet_packages(requirements)]


def unmet_packages(requirements: Sequence[str]) -> list[tuple[str, str]]:
    """The requirements not met by this process's environment, as
    ``(what is wrong, the requirement to pip install)``.

    A requirement is met by the distribution of its name, or else by the
    installed distributions that provide the module of that name:
    ``tensorflow`` by ``tensorflow-cpu``, ``PIL`` by ``pillow``. A version
    pin is compared with the version installed; the fix then names the
    installed distribution, never a second copy of the module.

    >>> unmet_packages(["dask>=1", "dask<1"])[0][0]  # doctest: +ELLIPSIS
    'dask<1 not met (dask ... installed)'
    """
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    unmet = []
    provided: Mapping[str, list[str]] | None = None
    for text in requirements:
        req = Requirement(text)
        try:
            found = [(req.name, version(req.name))]
        except PackageNotFoundError:
            if provided is None:
                from importlib.metadata import packages_distributions

                provided = packages_distributions()
            found = _providers(req.name, provided)
        if not found:
            unmet.append((f"{text} not installed", text))
            continue
        if not req.specifier or any(
            req.specifier.contains(v, prereleases=True) for _, v in found
        ):
            continue
        dist, got = found[0]
        provides = "" if dist == req.name else f", which provides {req.name}"
        unmet.append(
            (
                f"{text} not met ({dist} {got} installed{provides})",
                f"{dist}{req.specifier}",
            )
        )
    return unmet


def _providers(name: str, provided: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    """``(distribution, version)`` of the installed distributions that
    provide the top-level module ``name`` (or ``name`` with ``-`` as ``_``)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.utils import canonicalize_name

    for module in dict.fromkeys((name, name.replace("-", "_"), name.lower())):
        found: list[tuple[str, str]] = []
        for dist_name in dict.fromkeys(provided.get(module, [])):
            try:
                dist = distribution(dist_name)
            except PackageNotFoundError:
                continue
            found.append(
                (canonicalize_name(dist.metadata["Name"] or dist_name), dist.version)
            )
        if found:
            return found
    return []
