"""daskrun as people install it: ``python -m build`` makes a wheel and an
sdist that ``twine check`` passes, and the wheel, installed into a fresh
virtual environment, runs the README's quick start with nothing from the
source tree.

Offline and quick: the build uses this environment's setuptools
(``--no-isolation``), and the fresh environment reaches this one's
installed dependencies through a ``.pth`` file (not its editable daskrun:
``.pth`` files of a folder a ``.pth`` names are not read), the wheel
installed with ``--no-deps``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import daskrun

from .helpers import REPO, quick_start_blocks

# what a clone holds that is not the project's source
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "__pycache__", "*.egg-info", "build", "dist",
    ".*_cache", ".hypothesis", "daskrun-demo", "daskrun-tabular",
)  # fmt: skip


def _run(*args: str | Path, cwd: Path, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_the_wheel_installs_apart_and_runs_the_quick_start(tmp_path: Path) -> None:
    # a copy of the source: the build writes its egg-info beside it
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    dist = tmp_path / "dist"
    _run(
        sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source,
        cwd=tmp_path,
    )  # fmt: skip
    version = daskrun.__version__
    wheel = dist / f"daskrun-{version}-py3-none-any.whl"
    sdist = dist / f"daskrun-{version}.tar.gz"
    assert sorted(dist.iterdir()) == [wheel, sdist]
    checked = _run(
        sys.executable,
        "-m",
        "twine",
        "check",
        "--strict",
        *sorted(dist.iterdir()),
        cwd=tmp_path,
    )
    assert checked.count("PASSED") == 2, checked
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"daskrun-{version}.dist-info/METADATA").decode()
    # the package with its defaults and type marker; no tests, no examples
    assert {"daskrun/daskrun.yaml", "daskrun/py.typed", "daskrun/cli.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "examples/"))]
    assert "Provides-Extra: notebook" in metadata
    assert "Description-Content-Type: text/markdown" in metadata

    # a fresh environment, this one's dependencies reached through a .pth
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
             cwd=tmp_path).strip()
    )  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        python, "-m", "pip", "install", "--no-deps", "--no-index",
        "--ignore-installed", "--no-cache-dir", "--quiet", wheel,
        cwd=tmp_path,
    )  # fmt: skip

    # the quick start, in a folder of its own: daskrun is the wheel's
    work = tmp_path / "work"
    work.mkdir()
    shown = _run(
        python, "-c", "import daskrun; print(daskrun.__file__, daskrun.__version__)",
        cwd=work,
    )  # fmt: skip
    assert shown.split() == [str(site / "daskrun" / "__init__.py"), version]
    score, job = quick_start_blocks()[:2]
    (work / "score.py").write_text(score)
    (work / "job.py").write_text(job)
    (work / "images").mkdir()
    sizes = {f"img{i:02d}.png": 100 + i for i in range(25)}
    for name, size in sizes.items():
        (work / "images" / name).write_bytes(b"x" * size)
    runs = str(tmp_path / "runs")
    done = _run(python, "job.py", cwd=work, DASK_DASKRUN__RUNS_DIR=runs)
    out = work / "out" / "parallel_run_step.txt"
    assert f"Completed {out} 25 0" in done, done
    assert out.read_text().splitlines() == [f"{n}: {s}" for n, s in sizes.items()]

    # and the command the wheel installed, as the quick start types it
    readme = (REPO / "README.md").read_text()
    command = re.search(r"\n(daskrun run score\.py .*?)\n(?!\s)", readme, re.S)
    assert command, "README's Quick start has no 'daskrun run score.py' line"
    shutil.rmtree(work / "out")
    path = f"{venv / 'bin'}:{os.environ['PATH']}"
    done = _run(
        "bash", "-c", command.group(1), cwd=work, PATH=path, DASK_DASKRUN__RUNS_DIR=runs
    )
    assert f"output: {work / 'out' / 'parallel_run_step.txt'}" in done, done
    assert out.read_text().splitlines() == [f"{n}: {s}" for n, s in sizes.items()]
