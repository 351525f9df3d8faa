from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import dask.config
import pytest
from distributed import LocalCluster


@pytest.fixture(autouse=True)
def runs_dir(tmp_path: Path) -> Iterator[Path]:
    """Every test writes its run folders under its own tmp_path."""
    runs = tmp_path / "runs"
    with dask.config.set({"daskrun.runs-dir": str(runs)}):
        yield runs


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """Two real single-threaded worker processes, shared by the tests that
    do not need a cluster of their own."""
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as c:
        yield c


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
