"""What the live monitoring costs: a no-op job with and without the progress
display.

Runs the same no-op entry script over tiny files (10 per mini-batch) with
``show_output=False`` and with ``show_output=True`` — once with the progress
bar on a pseudo-terminal and once as plain lines into a file — alternating,
each in a fresh process, and reports the median time of ``step.run()`` on an
already started local cluster (so that cluster start-up does not hide the
difference). The log folder, job report, overview file and dashboard
snapshots are written in every mode: they are what resume and the dashboard
page need. Prints and saves ``benchmarks/results/monitoring.json``.

Usage::

    python benchmarks/bench_monitoring.py --files 20000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NOOP = "def init():\n    pass\n\ndef run(mini_batch):\n    return mini_batch\n"


def child(data: str, show: bool) -> None:
    import dask.config
    from distributed import LocalCluster

    from daskrun import Dataset, ParallelRunConfig, ParallelRunStep
    from daskrun.monitoring.console import Console

    # time spent in the display itself, measured directly: end-to-end times
    # on a small shared machine vary by more than the display costs
    spent = [0.0]
    for name in ("update", "say", "start", "close"):
        original = getattr(Console, name)

        def timed(self: Any, *args: Any, _original: Any = original) -> Any:
            t = time.perf_counter()
            try:
                return _original(self, *args)
            finally:
                spent[0] += time.perf_counter() - t

        setattr(Console, name, timed)

    folder = Path(tempfile.mkdtemp())
    script = folder / "noop.py"
    script.write_text(NOOP)
    with (
        dask.config.set({"daskrun.runs-dir": str(folder / "runs")}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
    ):
        step = ParallelRunStep(
            "bench-monitoring",
            ParallelRunConfig(str(script), mini_batch_size=10, compute_target=cluster),
            inputs=[Dataset.File.from_files(data)],
            output=str(folder / "out"),
        )
        start = time.perf_counter()
        run = step.run(show_output=show)
        seconds = time.perf_counter() - start
    assert run.status == "Completed", run.error
    print(
        json.dumps({"seconds": seconds, "display_seconds": spent[0]}),
        file=sys.__stdout__,
        flush=True,
    )


def measure(data: Path, mode: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(data), mode]
    if mode == "bar":  # stderr on a pseudo-terminal: the tqdm bar
        leader, follower = pty.openpty()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower)
        os.close(follower)
        while True:
            try:
                if not os.read(leader, 65536):
                    break
            except OSError:
                break
        out, _ = proc.communicate()
    else:
        with tempfile.TemporaryFile("w") as log:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
            out, _ = proc.communicate()
    assert proc.returncode == 0
    return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        data, mode = args.child
        child(data, mode != "off")
        return
    data = REPO / ".cache" / f"bench-monitoring-{args.files}"
    if not data.is_dir():
        tmp = data.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for i in range(args.files):
            (tmp / f"{i:07d}.txt").write_bytes(b"x")
        tmp.rename(data)
    modes = ("off", "bar", "lines")
    times: dict[str, list[float]] = {m: [] for m in modes}
    display: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode in modes:
            got = measure(data, mode)
            times[mode].append(got["seconds"])
            display[mode].append(got["display_seconds"])
            print(
                f"{mode}: {got['seconds']:.2f} s, display "
                f"{1000 * got['display_seconds']:.1f} ms",
                flush=True,
            )
    medians = {m: statistics.median(t) for m, t in times.items()}
    result = {
        "files": args.files,
        "mini_batch_size": 10,
        "seconds": times,
        "median_seconds": medians,
        "end_to_end_difference_percent": {
            m: round(100 * (medians[m] / medians["off"] - 1), 1)
            for m in ("bar", "lines")
        },
        "display_seconds": display,
        # the display's own time as a share of the job's, per run (median)
        "display_cost_percent": {
            m: round(
                100
                * statistics.median(
                    d / t for d, t in zip(display[m], times[m], strict=True)
                ),
                2,
            )
            for m in ("bar", "lines")
        },
    }
    print(json.dumps(result, indent=2))
    out = REPO / "benchmarks" / "results" / "monitoring.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
