"""Speculative copies at a job's tail, on real worker processes: one worker
is slowed down, and the output stays exactly once (daskrun.engine.speculation)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
import pandas as pd
import pytest
import yaml

import daskrun
from daskrun import Dataset
from daskrun.backends.inputs.datasets import FileBatch, SubBatch
from daskrun.engine.lost import stall_message
from daskrun.engine.plugin import TryResult
from daskrun.engine.speculation import Speculation

from .helpers import make_files, run_step


@pytest.fixture(autouse=True)
def _speculate() -> Iterator[None]:
    # on by default (daskrun.runner.speculate), and whatever the user's
    # config says; a test may turn it off again inside
    with dask.config.set({"daskrun.runner.speculate": True}):
        yield


SLOW = 3.0

# The first worker to start claims to be slow: each of its mini-batches takes
# SLOW seconds (it notes their items in slow.log first). With POISON, the
# first item the slow worker got fails on any worker; with KILL_COPY, a
# fast worker that gets an item the slow worker holds (a copy) dies; a copy
# leaves the file "copied".
SCRIPT = """
import os, time
from distributed import get_worker

STATE = {state!r}
POISON, KILL_COPY = {poison!r}, {kill_copy!r}
MARKER, LOG = os.path.join(STATE, "slow"), os.path.join(STATE, "slow.log")


def init():
    try:
        fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)


def _slow_items():
    if not os.path.exists(LOG):
        return []
    with open(LOG) as f:
        return [line.split()[0] for line in f]


def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    with open(MARKER) as f:
        slow = f.read() == str(os.getpid())
    if slow:
        with open(LOG, "a") as f:
            f.writelines(
                f"{{n}} worker-{{get_worker().name}} {{time.time()}}\\n" for n in names
            )
        time.sleep({slow})
    elif set(names) & set(_slow_items()):  # a copy
        open(os.path.join(STATE, "copied"), "w").close()
        if KILL_COPY:
            os._exit(3)
        time.sleep(0.1)
    else:
        time.sleep(0.1)
    held = _slow_items()
    if POISON and held and held[0] in names:
        raise ValueError("poison " + held[0])
    return names
"""


def _run(
    tmp_path: Path,
    n: int,
    poison: bool = False,
    kill_copy: bool = False,
    seconds: float = SLOW,
    **config: Any,
) -> tuple[Any, pd.DataFrame, dict[str, str], float]:
    """Run the script over ``n`` files on two workers, one of them slowed
    to ``seconds`` a mini-batch: the run, its report, the items the slow
    worker started (with its name), and the seconds from the last of them
    to the job's end."""
    make_files(tmp_path / "in", n, prefix="f")
    body = SCRIPT.format(
        state=str(tmp_path), poison=poison, kill_copy=kill_copy, slow=seconds
    )
    run = run_step(
        tmp_path,
        body,
        Dataset.File.from_files(str(tmp_path / "in")),
        process_count_per_node=2,
        **config,
    )
    ended = time.time()
    report = pd.read_csv(
        Path(run.logs_dir) / "sys/job_report/processed_mini-batches.csv"
    )
    slow_log = (tmp_path / "slow.log").read_text().split("\n")
    slow = {name: agent for name, agent, _ in map(str.split, filter(None, slow_log))}
    began = max(float(line.split()[2]) for line in slow_log if line)
    return run, report, slow, ended - began


def _lines(run: Any) -> list[str]:
    return Path(run.output_path or "").read_text().splitlines()


def test_a_slow_worker_does_not_hold_the_tail(tmp_path: Path) -> None:
    run, report, slow, after = _run(tmp_path, 12, seconds=8, mini_batch_size=1)
    assert (tmp_path / "copied").exists()
    # the job ended, its cluster closed, before the slow worker's last
    # mini-batch would have
    assert after < 8, after
    assert run.status == "Completed", run.error
    # exactly once, in order
    assert _lines(run) == [f"f{i:05d}.txt" for i in range(12)]
    assert sorted(report["index"]) == list(range(12))
    assert (report["tries"] == 1).all()
    # the mini-batch the slow worker held when nothing was left was won by
    # a copy on the fast worker
    (slow_agent,) = set(slow.values())
    last = max(int(name[1:6]) for name in slow)
    winner = report.set_index("index").loc[last, "worker"]
    assert winner != slow_agent, report
    assert run.items_succeeded == 12 and run.items_failed == 0


def test_no_copy_when_speculation_is_off(tmp_path: Path) -> None:
    with dask.config.set({"daskrun.runner.speculate": False}):
        run, report, slow, elapsed = _run(tmp_path, 8, mini_batch_size=1)
    assert not (tmp_path / "copied").exists()
    assert run.status == "Completed", run.error
    assert _lines(run) == [f"f{i:05d}.txt" for i in range(8)]
    by_index = report.set_index("index")
    # every mini-batch the slow worker started, it finished
    for name, agent in slow.items():
        assert by_index.loc[int(name[1:6]), "worker"] == agent
    assert sorted(report["index"]) == list(range(8))


def test_a_copy_whose_worker_dies_costs_nothing(tmp_path: Path) -> None:
    run, report, slow, _ = _run(tmp_path, 6, kill_copy=True, mini_batch_size=1)
    assert (tmp_path / "copied").exists()
    assert run.status == "Completed", run.error
    assert _lines(run) == [f"f{i:05d}.txt" for i in range(6)]
    assert sorted(report["index"]) == list(range(6))
    # the original finished; the lost copy charged no try
    assert (report["tries"] == 1).all(), report
    assert run.mini_batches_failed == 0 and run.items_failed == 0
    by_index = report.set_index("index")
    last = max(int(name[1:6]) for name in slow)
    assert by_index.loc[last, "worker"] == slow[f"f{last:05d}.txt"]


def test_a_poison_item_in_a_speculated_batch_counts_once(tmp_path: Path) -> None:
    run, report, slow, _ = _run(
        tmp_path,
        8,
        poison=True,
        mini_batch_size=2,
        run_max_try=1,
        error_threshold=5,
    )
    assert (tmp_path / "copied").exists()
    poison = next(iter(slow))
    assert run.status == "Completed", run.error
    assert run.items_failed == 1 and run.mini_batches_failed == 1
    assert run.items_succeeded == 7
    expected = [f"f{i:05d}.txt" for i in range(8) if f"f{i:05d}.txt" != poison]
    assert _lines(run) == expected
    assert sorted(report["index"]) == list(range(4))
    failed = report[report["items_failed"] > 0]
    assert len(failed) == 1 and poison in failed["error"].iloc[0]


def test_speculation_is_on_by_default() -> None:
    defaults = yaml.safe_load(
        (Path(daskrun.__file__).parent / "daskrun.yaml").read_text()
    )
    assert defaults["daskrun"]["runner"]["speculate"] is True


def test_only_plain_first_tries_well_within_the_timeout_are_copied() -> None:
    """A retry, a piece being isolated, a mini-batch rerun after its task
    was lost, one whose worker is gone, and one past half of the timeout
    (more likely hung than slow) get no copy; a plain first try gets one,
    once."""
    spec = Speculation(timeout=10)
    spec.observe([TryResult(0, 1, True, "worker-0", 1, 1, 0.1)])  # 0.1 s each
    batch = {i: FileBatch.of(i, [f"f{i}.png"]) for i in range(1, 7)}
    pending: dict[Any, list[tuple[Any, int]]] = {
        "plain": [(batch[1], 1)],
        "retry": [(batch[2], 2)],
        "piece": [(SubBatch(FileBatch.of(3, ["a", "b"]), 0, 1), 1)],
        "near-timeout": [(batch[4], 1)],
        "worker-gone": [(batch[5], 1)],
        "rerun": [(batch[6], 1)],
    }
    now = time.monotonic()
    for key in pending:
        spec.began[key] = ("tcp://a", now - 3)
    spec.began["near-timeout"] = ("tcp://a", now - 6)
    spec.began["worker-gone"] = ("tcp://gone", now - 3)
    assert spec.rerun("lost", [(batch[6], 1)], pending) == [(batch[6], 1)]
    threads = {"tcp://a": 8, "tcp://b": 8}
    assert spec.choose(pending, lambda: threads) == [("plain", "tcp://b")]
    spec.pair("plain", "copy", "tcp://b")
    pending["copy"] = list(pending["plain"])
    assert spec.choose(pending, lambda: threads) == []
    # the copy was lost: the original runs on, and is not copied again
    spec.forget("copy")
    del pending["copy"]
    spec.forget("plain")
    spec.began["plain"] = ("tcp://a", now - 3)
    assert spec.choose(pending, lambda: threads) == []


def test_a_stall_names_the_speculative_copies() -> None:
    held = {"worker-0": [FileBatch.of(3, ["a.png"])]}
    held["worker-1"] = held["worker-0"]
    line = stall_message(60, "progress-timeout", 2, held, {"worker-1": [3]})
    assert "worker-0 holds mini-batch 3 (files a.png); " in line
    assert "worker-1 holds mini-batch 3 (files a.png), a speculative copy" in line


def test_twins_that_both_fail_count_once_naming_both() -> None:
    spec, a = Speculation(), FileBatch.of(0, ["a.png"])
    spec.pair("original", "copy")
    pending = {"original": [(a, 1)], "copy": [(a, 1)]}
    first = TryResult(0, 1, False, "worker-0", None, 0, 0.0, error="TimeoutError: x")
    assert spec.kept("original", a, first, pending) is None
    del pending["original"]
    second = TryResult(0, 1, False, "worker-1", None, 0, 0.0, error="TimeoutError: y")
    counted = spec.kept("copy", a, second, pending)
    assert counted is not None
    assert counted.error == (
        "TimeoutError: y (the try it copied, on worker-0, failed too: TimeoutError: x)"
    )
