"""What speculative copies gain at a job's tail: one slowed worker, with
``daskrun.runner.speculate`` on and off.

Three single-threaded worker processes of one already started local cluster
run the same job: each file costs ``--fast`` seconds in ``run()``, but on
one worker (the first whose ``init()`` claims it, per run) ``--slow``
seconds. Cheap mini-batches share a task (``daskrun.runner.task-seconds``),
so the slow worker's last task can hold the job's tail for several seconds;
with speculation a copy of it runs on an idle fast worker and the first
result counts. Runs alternate (on, off, on, off, ...) and the median of
``--repeat`` wall times of ``step.run()`` is reported for each, with the
output checked exact. Between runs the bench waits for the slow worker's
cancelled copy (a running task cannot be stopped) to return. A straggler
must run over a second to be copied (``speculation.MIN_SECONDS``): with a
slowed file of 1 s or less there is nothing to gain, and the two medians
agree within noise. Prints and saves ``benchmarks/results/speculation.json``.

Usage::

    python benchmarks/bench_speculation.py --files 60 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import dask.config
from distributed import LocalCluster

from daskrun import Dataset, ParallelRunConfig, ParallelRunStep

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """
import os, time

STATE = os.environ["DASKRUN_BENCH_STATE"]


def _state():
    with open(os.path.join(STATE, "current")) as f:
        return f.read()


def init():
    try:
        marker = os.path.join(_state(), "slow")
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)


def run(mini_batch):
    state = _state()
    with open(os.path.join(state, "slow")) as f:
        slow = f.read() == str(os.getpid())
    busy = os.path.join(STATE, f"busy-{{os.getpid()}}")
    open(busy, "w").close()
    try:
        time.sleep(({slow} if slow else {fast}) * len(mini_batch))
    finally:
        os.remove(busy)
    return [os.path.basename(p) for p in mini_batch]
"""


def timed_run(root: Path, n: int, cluster: LocalCluster, speculate: bool) -> float:
    """Seconds of one ``step.run()``; its output is checked exact."""
    state = root / f"state-{n}"
    state.mkdir()
    (root / "current").write_text(str(state))
    out = root / f"out-{n}"
    cfg = ParallelRunConfig(
        str(root / "score.py"),
        mini_batch_size=1,
        error_threshold=0,
        output_action="append_row",
        compute_target=cluster.scheduler_address,
    )
    step = ParallelRunStep(
        "bench-speculation",
        cfg,
        inputs=[Dataset.File.from_files(str(root / "in"))],
        output=str(out),
    )
    with dask.config.set({"daskrun.runner.speculate": speculate}):
        start = time.perf_counter()
        run = step.run(show_output=False)
        seconds = time.perf_counter() - start
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == sorted(p.name for p in (root / "in").iterdir()), "not exact"
    # a cancelled loser still sleeps on its worker: let it return
    while any(root.glob("busy-*")):
        time.sleep(0.1)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fast", type=float, default=0.02)
    parser.add_argument("--slow", type=float, default=3.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-speculation-"))
    (root / "score.py").write_text(SCRIPT.format(slow=args.slow, fast=args.fast))
    (root / "in").mkdir()
    for i in range(args.files):
        (root / "in" / f"f{i:06d}.txt").write_text(str(i))
    times: dict[str, list[float]] = {"on": [], "off": []}
    with (
        dask.config.set({"daskrun.runs-dir": str(root / "runs")}),
        LocalCluster(
            n_workers=3,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            env={"DASKRUN_BENCH_STATE": str(root)},
        ) as cluster,
    ):
        n = 0
        for _ in range(args.repeat):
            for mode in ("on", "off"):
                n += 1
                times[mode].append(timed_run(root, n, cluster, mode == "on"))
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    result = {
        "files": args.files,
        "workers": 3,
        "fast_seconds_per_file": args.fast,
        "slow_seconds_per_file": args.slow,
        "repeat": args.repeat,
        "speculate_on_median_s": round(on, 3),
        "speculate_off_median_s": round(off, 3),
        "speedup": round(off / on, 2),
        "times": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "machine": platform.platform(),
    }
    print(json.dumps(result, indent=2))
    out = REPO / "benchmarks" / "results" / "speculation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
