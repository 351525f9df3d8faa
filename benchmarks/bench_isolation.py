"""What isolating failed items costs: a W1-like job (tiny files, each read
and turned into one line) with 1 % poison files against the same job
without poison.

With poison, a mini-batch holding a poison file fails its try and is split
in halves down to the poison files (``daskrun.isolate-failures``), each
piece tried once; ``run_max_try=1``, so what is measured is the isolation
alone, not the retries of the whole mini-batch before it. Both jobs run on
one already started local cluster (two single-threaded worker processes),
alternating, and the median of ``--repeat`` wall times of ``step.run()`` is
reported for each mini_batch_size. Prints and saves
``benchmarks/results/isolation.json``.

Usage::

    python benchmarks/bench_isolation.py --files 3000 --repeat 3
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
import os

def init():
    pass

def run(mini_batch):
    out = []
    for p in mini_batch:
        with open(p) as f:
            text = f.read()
        if "poison" in os.path.basename(p):
            raise ValueError(f"cannot score {os.path.basename(p)}")
        out.append(f"{os.path.basename(p)} {len(text)}")
    return out
"""


def make_inputs(folder: Path, n: int, poison: bool) -> None:
    """``n`` tiny files; with ``poison``, every 100th (from the 37th) is one."""
    folder.mkdir(parents=True)
    for i in range(n):
        bad = poison and i % 100 == 37
        (folder / f"f{i:06d}{'-poison' if bad else ''}.txt").write_text(str(i))


def timed_run(
    root: Path, data: Path, size: int, cluster: LocalCluster, tag: str
) -> tuple[float, int, int]:
    """Seconds of one ``step.run()``, and its items ok and failed."""
    out = root / f"out-{tag}"
    cfg = ParallelRunConfig(
        str(root / "score.py"),
        mini_batch_size=size,
        error_threshold=-1,
        run_max_try=1,
        output_action="append_row",
        compute_target=cluster.scheduler_address,
    )
    step = ParallelRunStep(
        "bench-isolation",
        cfg,
        inputs=[Dataset.File.from_files(str(data))],
        output=str(out),
    )
    start = time.perf_counter()
    run = step.run(show_output=False)
    seconds = time.perf_counter() - start
    assert run.status == "Completed", run.error
    return seconds, run.items_succeeded, run.items_failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="10,100")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-isolation-"))
    (root / "score.py").write_text(SCRIPT)
    for poison in (False, True):
        make_inputs(root / ("poison" if poison else "clean"), args.files, poison)
    results = []
    with (
        dask.config.set({"daskrun.runs-dir": str(root / "runs")}),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1"
        ) as cluster,
    ):
        n = 0
        for size in (int(s) for s in args.sizes.split(",")):
            times: dict[str, list[float]] = {"clean": [], "poison": []}
            counts: dict[str, tuple[int, int]] = {}
            for _ in range(args.repeat):
                for kind in ("clean", "poison"):
                    n += 1
                    seconds, ok, failed = timed_run(
                        root, root / kind, size, cluster, f"{kind}-{n}"
                    )
                    times[kind].append(seconds)
                    counts[kind] = (ok, failed)
            clean = statistics.median(times["clean"])
            poison = statistics.median(times["poison"])
            row = {
                "mini_batch_size": size,
                "files": args.files,
                "poison_files": counts["poison"][1],
                "items_ok_with_poison": counts["poison"][0],
                "clean_median_s": round(clean, 3),
                "poison_median_s": round(poison, 3),
                "ratio": round(poison / clean, 2),
                "clean_s": [round(t, 3) for t in times["clean"]],
                "poison_s": [round(t, 3) for t in times["poison"]],
            }
            results.append(row)
            print(
                f"mini_batch_size={size}: clean {clean:.2f} s, 1% poison "
                f"{poison:.2f} s ({poison / clean:.2f}x), "
                f"{counts['poison'][0]} ok, {counts['poison'][1]} failed"
            )
    report = {
        "benchmark": "isolation",
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "workers": "2 processes x 1 thread",
        "run_max_try": 1,
        "results": results,
    }
    path = REPO / "benchmarks" / "results" / "isolation.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
