"""This machine's workers and the bounds on reaching them: the GPUs and
cores a local cluster gets a worker process for, and the configured seconds
to start local workers and to reach a scheduler."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from typing import Any

from daskrun.engine.config import config_get
from daskrun.exceptions import ConfigError

logger = logging.getLogger("daskrun")


def gpu_count() -> int:
    """NVIDIA GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else
    ``nvidia-smi -L``); 0 without any."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() not in ("", "-1")])
    return _listed_gpus()


@functools.cache
def _listed_gpus() -> int:
    """``nvidia-smi -L``'s GPUs, asked once per process (a subprocess)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        done = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return done.stdout.count("GPU ") if done.returncode == 0 else 0


def cpu_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_process_count() -> int:
    """One worker process per GPU on a GPU machine, else one per core."""
    return gpu_count() or cpu_cores()


def cuda_cluster_class() -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        logger.warning(
            "GPUs found but dask-cuda is not installed; workers are not pinned "
            "to GPUs (pip install 'daskrun[cuda]')"
        )
        return None
    return LocalCUDACluster


def start_timeout() -> float:
    """``daskrun.local-cluster.start-timeout``, checked."""
    return _seconds("local-cluster.start-timeout", 60)


def connect_timeout() -> float:
    """``daskrun.connect-timeout``, checked."""
    return _seconds("connect-timeout", 10)


def _seconds(key: str, example: int) -> float:
    value = config_get(key)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        env = "DASK_DASKRUN__" + key.upper().replace("-", "_").replace(".", "__")
        raise ConfigError(
            f"daskrun.{key}={value!r} is not a number of seconds; set it to "
            f"e.g. {example} ({env}={example})"
        )
    return seconds
