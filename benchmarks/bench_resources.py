"""What resource sampling costs: per sample on a worker and on the client,
and a CPU-bound job end to end with sampling off and every 0.2 s.

The per-sample costs are measured directly (on a real worker process:
:meth:`ResourceSampler.sample`, which reads distributed's system monitor
and sends a worker event; on the client: :meth:`PerfLog.add`, which writes
the CSV row); end-to-end times on a small shared machine vary by more than
sampling costs, so they are the median of alternating runs. Prints and saves
``benchmarks/results/resources.json``.

Usage::

    python benchmarks/bench_resources.py --mini-batches 40 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUSY = """
import time

def init():
    pass

def run(mini_batch):
    end = time.process_time() + 0.05   # 50 ms of CPU
    while time.process_time() < end:
        pass
    return mini_batch
"""


def _worker_sample_cost(n: int, dask_worker: Any) -> float:
    """On a worker: seconds per sample, taken ``n`` times."""
    from daskrun.monitoring.resources import ResourceSampler

    sampler = ResourceSampler(dask_worker, "bench-perf", "worker-0", 3600, lambda: 1)
    start = time.perf_counter()
    for _ in range(n):
        sampler.sample()
    seconds = (time.perf_counter() - start) / n
    sampler.stop()
    return seconds


def client_sample_cost(n: int) -> float:
    from daskrun.monitoring.resources import PerfLog

    log = PerfLog(Path(tempfile.mkdtemp()) / "perf", print)
    msg = {"agent": "worker-0", "time": time.time(), "index": 3, "limit": 2**32}
    msg |= {"cpu": 42.0, "rss": 2**27, "gpu": None, "gpu_memory": None}
    start = time.perf_counter()
    for _ in range(n):
        log.add((0.0, msg))
    seconds = (time.perf_counter() - start) / n
    log.close()
    return seconds


def job_seconds(mini_batches: int, interval: float | None) -> tuple[float, int]:
    """Seconds of ``step.run()`` (cluster start included) and the samples
    written."""
    import dask.config

    from daskrun import Dataset, ParallelRunConfig, ParallelRunStep

    folder = Path(tempfile.mkdtemp())
    (folder / "in").mkdir()
    for i in range(mini_batches):
        (folder / "in" / f"{i:05d}.txt").write_text(str(i))
    (folder / "busy.py").write_text(BUSY)
    settings = {"daskrun.resource-interval": interval, "daskrun.runs-dir": str(folder)}
    with dask.config.set(settings):
        step = ParallelRunStep(
            "bench-resources",
            ParallelRunConfig(
                str(folder / "busy.py"), mini_batch_size=1, process_count_per_node=2
            ),
            inputs=[Dataset.File.from_files(str(folder / "in"))],
            output=str(folder / "out"),
        )
        start = time.perf_counter()
        run = step.run()
        seconds = time.perf_counter() - start
    assert run.status == "Completed", run.error
    rows = sum(
        len(p.read_text().splitlines()) - 1
        for p in Path(run.logs_dir, "perf").glob("*.csv")
    )
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mini-batches", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster,
        Client(cluster) as client,
    ):
        worker_cost = next(iter(client.run(_worker_sample_cost, args.samples).values()))
    client_cost = client_sample_cost(args.samples)
    times: dict[str, list[float]] = {"off": [], "0.2 s": []}
    rows: dict[str, int] = {}
    for _ in range(args.repeat):  # alternating, so drift hits both alike
        for label, interval in (("off", None), ("0.2 s", 0.2)):
            seconds, rows[label] = job_seconds(args.mini_batches, interval)
            times[label].append(seconds)
    figures = {
        "worker_seconds_per_sample": worker_cost,
        "client_seconds_per_sample": client_cost,
        "job": {
            "mini_batches": args.mini_batches,
            "cpu_seconds_per_mini_batch": 0.05,
            "workers": 2,
            "repeat": args.repeat,
            "median_seconds": {k: statistics.median(v) for k, v in times.items()},
            "all_seconds": times,
            "perf_rows": rows,
        },
    }
    print(
        f"per sample: worker {worker_cost * 1e6:.0f} µs, client "
        f"{client_cost * 1e6:.0f} µs"
    )
    for label, values in times.items():
        print(
            f"job, sampling {label}: median {statistics.median(values):.2f} s "
            f"({', '.join(f'{v:.2f}' for v in values)}), {rows[label]} perf rows"
        )
    out = REPO / "benchmarks" / "results" / "resources.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
