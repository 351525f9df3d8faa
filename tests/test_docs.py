"""Every code block of the documentation (README.md, docs/*.md) runs.

The blocks of a page run in order, in a temporary folder holding the sample
files they name (images, tables, Parquet, entry scripts), with HOME there too,
so the default workspace and runs folder are the test's own: ``python`` blocks
in one interpreter, as a notebook's cells, ``bash`` blocks through bash with
the environment's console scripts (``daskrun``) first on PATH. A block after
``<!-- file: NAME -->`` is written to NAME (an entry script) instead; one
after ``<!-- not run: REASON -->`` is not run, and says why; a ``text`` block
after ``<!-- output of: COMMAND -->`` is checked against what COMMAND prints.
The README's blocks are docs/getting-started.md's, checked, and run there.
docs/contributing.md describes the markers. Real processes, real files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN = ("python", "bash")
SHOWN = ("text", "")
MARKER = re.compile(r"^<!-- (file|not run|output of): (.+?) -->$")
FENCE = re.compile(r"^( *)(```+|~~~+)(.*)$")
# blocks that cannot run here: few, and each says why
MOST_NOT_RUN = 8


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    marker: str | None = None  # "file", "not run", "output of"
    value: str = ""  # the file's name, the reason, the command

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, with the marker just before each.

    MyST directives (```` ```{toctree} ````) are not code and are left out.
    """
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, ticks, lang = len(fence.group(1)), fence.group(2), fence.group(3)
        end = i + 1
        while lines[end].strip() != ticks:
            end += 1
        code = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        if not lang.strip().startswith("{"):
            block = Block(page.relative_to(REPO).as_posix(), i + 1, lang.strip(), code)
            before = [line.strip() for line in lines[:i] if line.strip()]
            marker = MARKER.match(before[-1]) if before else None
            if marker:
                block.marker, block.value = marker.group(1), marker.group(2).strip()
            found.append(block)
        i = end + 1
    return found


ALL = [block for page in PAGES for block in blocks(page)]


def test_every_block_runs_or_says_why() -> None:
    assert len(ALL) > 20, [b.where for b in ALL]
    for block in ALL:
        assert block.lang in RUN + SHOWN, f"{block.where}: a {block.lang!r} block"
        if block.marker == "not run":
            assert block.lang in RUN, block.where
            assert len(block.value.split()) >= 4, f"{block.where}: say why not"
        elif block.marker == "file":
            assert block.lang == "python", block.where
            assert re.fullmatch(r"[\w-]+\.py", block.value), block.where
        elif block.marker == "output of":
            assert block.lang in SHOWN, block.where
    not_run = [b.where for b in ALL if b.marker == "not run"]
    assert len(not_run) <= MOST_NOT_RUN, not_run
    # every page with a block to run is run below
    to_run = {b.page for b in ALL if b.lang in RUN and b.marker != "not run"}
    to_run |= {b.page for b in ALL if b.marker == "output of"}
    to_run.discard("README.md")
    assert to_run == set(QUICK) | set(SLOW), to_run ^ (set(QUICK) | set(SLOW))


def test_the_readme_blocks_are_getting_started_ones() -> None:
    """The README's quick start is Getting started's, block for block, so
    it runs there (once, not twice)."""
    started = {(b.lang, b.code, b.marker, b.value) for b in blocks(REPO / GUIDE)}
    for block in blocks(REPO / "README.md"):
        if block.lang in RUN:
            key = (block.lang, block.code, block.marker, block.value)
            assert key in started, f"{block.where} is not in {GUIDE}"


# --- the sample files -------------------------------------------------------

QUICK_START_SCORE = next(
    b.code for b in blocks(REPO / "README.md") if b.value == "score.py"
)

POISON = """\
import os


def init():
    pass


def run(mini_batch):
    for path in mini_batch:
        if "poison" in path:
            raise ValueError(f"cannot score {os.path.basename(path)}")
    return [os.path.basename(path) for path in mini_batch]
"""

FIXED = POISON.replace('if "poison" in path:', "if False:")


def samples(work: Path) -> None:
    """The files the pages' blocks name, as a reader would have them."""
    (work / "home").mkdir()
    (work / "images").mkdir()
    for i in range(25):
        (work / "images" / f"img{i:02d}.png").write_bytes(b"x" * (100 + i))
    (work / "models").mkdir()
    (work / "score.py").write_text(QUICK_START_SCORE)
    (work / "tables").mkdir()
    for i in range(3):
        table = pd.DataFrame({"a": range(i, i + 50), "b": range(50)})
        table.to_csv(work / "tables" / f"t{i}.csv", index=False)
    (work / "in").mkdir()
    for i in range(4):
        part = pd.DataFrame({"id": range(i * 250, (i + 1) * 250)})
        part["x"] = part["id"] / 1000
        part.to_parquet(work / "in" / f"part{i}.parquet")
    (work / "data").mkdir()
    for name in ["f00000.txt", "f00001.txt", "f00002-poison.txt", "f00003.txt"]:
        (work / "data" / name).write_text(name)
    (work / "poison.py").write_text(POISON)
    # commands typed at the checkout's root: its .venv, examples and docs
    (work / ".venv").symlink_to(Path(sys.executable).parents[1])
    (work / "examples").symlink_to(REPO / "examples")
    (work / "daskrun").symlink_to(REPO / "daskrun")
    (work / "docs").mkdir()
    for path in (REPO / "docs").iterdir():
        if path.is_file():
            (work / "docs" / path.name).write_bytes(path.read_bytes())


def environment(work: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DASK_", "XDG_", "PYTEST_"))
    }
    env.update(
        HOME=str(work / "home"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(REPO),  # this checkout's daskrun, in every process
    )
    return env


def _daskrun(
    work: Path, env: dict[str, str], *args: str, more: dict[str, str] | None = None
) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "daskrun", *args],
        cwd=work,
        env={**env, **(more or {})},
        capture_output=True,
        text=True,
        timeout=180,
    )
    return done.stdout + done.stderr


def _last_run_id(work: Path, env: dict[str, str]) -> str:
    listed = _daskrun(work, env, "runs", "list", "--json")
    return str(json.loads(listed.splitlines()[0])["run_id"])


def a_run(work: Path, env: dict[str, str]) -> None:
    """`RUN_ID`: a completed run."""
    _daskrun(work, env, "run", "score.py", "--input", "images/", "--output", "out/")
    env["RUN_ID"] = _last_run_id(work, env)


def a_failed_run_then_fixed(work: Path, env: dict[str, str]) -> None:
    """`RUN_ID`: a run that failed on one file; then `score.py` is fixed."""
    (work / "score.py").write_text(POISON)
    failed = _daskrun(  # one try: the failure is all this needs
        work, env, "run", "score.py", "--input", "data/", "--output", "out/",
        "--mini-batch-size", "1", "--error-threshold", "0",
        more={"DASK_DASKRUN__RUN_MAX_TRY": "1"},
    )  # fmt: skip
    assert "job failed: error_threshold=0 exceeded" in failed, failed
    env["RUN_ID"] = _last_run_id(work, env)
    (work / "score.py").write_text(FIXED)


# --- running a page ---------------------------------------------------------

DRIVER = """\
import json, subprocess, sys, traceback


def main():
    namespace = {"__name__": "__main__"}
    for block in json.load(open(sys.argv[1])):
        where = block["where"]
        if block["marker"] == "file":
            with open(block["value"], "w") as f:
                f.write(block["code"])
            continue
        print(f"=== {where}", flush=True)
        print(f"=== {where}", file=sys.stderr, flush=True)
        if block["lang"] == "python":
            try:
                exec(compile(block["code"], where, "exec"), namespace)
            except BaseException:
                traceback.print_exc()
                sys.exit(f"FAILED: {where}")
            continue
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["code"]])
        if done.returncode:
            sys.exit(f"FAILED: {where} (exit status {done.returncode})")


if __name__ == "__main__":  # worker processes import this file again
    main()
"""


NUMBER = r"\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def gist(shown: str) -> re.Pattern[str]:
    """A line shown, as a pattern: numbers, paths and run ids may differ."""
    token = re.compile(
        r"(?P<id>\b[\w-]+_\d{8}T\d{6}_[0-9a-f]{6}\b)"
        r"|(?P<path>\S*/\S*)"
        r"|(?P<number>\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
        r"|(?P<any>…|\.\.\.)"
    )
    pattern, at = "", 0
    for found in token.finditer(shown):
        pattern += re.escape(shown[at : found.start()])
        kind = found.lastgroup
        pattern += {"id": r"\S+", "path": r"\S+", "number": NUMBER}.get(
            kind or "", ".*"
        )
        at = found.end()
    return re.compile(pattern + re.escape(shown[at:]))


def check_output(block: Block, work: Path, env: dict[str, str]) -> None:
    done = subprocess.run(
        ["bash", "-c", block.value],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    printed = [line.strip() for line in (done.stdout + done.stderr).splitlines()]
    for shown in block.code.strip().splitlines():
        pattern = gist(shown.strip())
        assert any(pattern.fullmatch(line) for line in printed), (
            f"{block.where}: {shown!r} is not among what {block.value!r} printed:\n"
            + "\n".join(printed)
        )


def run_page(page: str, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    work = tmp_path / "work"
    work.mkdir()
    samples(work)
    env = environment(work)
    setup = SETUP.get(page)
    if setup:
        setup(work, env)
    todo = [
        b
        for b in blocks(REPO / page)
        if b.marker == "file" or (b.lang in RUN and b.marker != "not run")
    ]
    script = tmp_path / "blocks.json"
    script.write_text(
        json.dumps(
            [{**b.__dict__, "where": b.where} for b in todo],
        )
    )
    (tmp_path / "driver.py").write_text(DRIVER)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(script)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    for block in blocks(REPO / page):
        if block.marker == "output of":
            check_output(block, work, env)
    return work, env


SETUP = {"docs/from-azureml.md": a_run, "docs/faults.md": a_failed_run_then_fixed}
QUICK = [
    "docs/speed.md",
    "docs/faults.md",
    "docs/from-azureml.md",
    "docs/architecture.md",
    "docs/hpc.md",
]
GUIDE = "docs/getting-started.md"
SLOW = [
    GUIDE,
    "docs/from-dask.md",
    "docs/monitoring.md",
    "docs/inputs.md",
    "docs/contributing.md",
]


@pytest.mark.parametrize("page", QUICK)
def test_page_runs(page: str, tmp_path: Path) -> None:
    work, _ = run_page(page, tmp_path)
    if page == "docs/faults.md":  # the fixed script scored every file, once
        out = work / "out" / "parallel_run_step.txt"
        assert out.read_text().split() == sorted(os.listdir(work / "data"))


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW)
def test_slow_page_runs(page: str, tmp_path: Path) -> None:
    work, _ = run_page(page, tmp_path)
    if page == GUIDE:
        out = (work / "out" / "parallel_run_step.txt").read_text().splitlines()
        assert len(out) == 25  # the notebook cell wrote it last: one line an image
    if page == "docs/monitoring.md":
        logs = (work / "home" / ".daskrun" / "runs").glob(
            "logged_*/logs/user/entry_script_log/*.txt"
        )
        assert any("loading the model on" in p.read_text() for p in logs)
    if page == "docs/contributing.md":  # the site, built with -W
        assert (work / "docs" / "_build" / "html" / "api.html").is_file()
