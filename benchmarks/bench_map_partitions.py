"""W3 through ``daskrun.map_partitions`` beside the step, on one cluster.

``bench_workloads.py`` times each tool in a fresh process, from its start
to its exit: imports (``dask.dataframe`` for the map paths) and the cluster's
start and close count there. This script times the work alone: one
``LocalCluster(2)``, started once, runs in rotation, ``--repeat`` times,

- ``step``: a ParallelRunStep over the CSV files (``mini_batch_size="16MB"``,
  ``output_format="csv"``, ``compute_target=client``);
- ``map-write``: ``dd.read_csv(blocksize="16MB")`` →
  ``daskrun.map_partitions`` → ``daskrun.map_run(scored).write(folder)``
  (the step's writer on each worker, parts assembled once);
- ``map-to-csv``: the same → ``.to_csv(single_file=True)`` (pandas, one
  partition after another, as Dask writes one file).

Each map run is split in its phases: inferring the result's type on a
sample, running the partitions, writing. Saves
``benchmarks/results/map-partitions-w3-same-cluster.json``. Usage::

    python benchmarks/bench_map_partitions.py            # W3 300 MB, 3 runs
    python benchmarks/bench_map_partitions.py --mb 100 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_workloads import W3_SCRIPT, _local_cluster, w3_data

REPO = Path(__file__).resolve().parent.parent


def _step(client: Any, data: Path, script: Path, out: Path) -> dict[str, float]:
    from daskrun import Dataset, ParallelRunConfig, ParallelRunStep

    config = ParallelRunConfig(
        str(script), mini_batch_size="16MB", output_format="csv", compute_target=client
    )
    inputs = Dataset.Tabular.from_delimited_files(str(data))
    step = ParallelRunStep("bench", config, inputs=[inputs], output=str(out))
    start = time.perf_counter()
    run = step.run()
    assert run.status == "Completed", run.error
    return {"total": time.perf_counter() - start}


def _map(data: Path, script: Path, out: Path, write: bool) -> dict[str, float]:
    import dask.dataframe as dd

    import daskrun
    from daskrun.engine import maprun

    phases: dict[str, float] = {}
    infer, run = maprun._infer_meta, maprun.MapRun.run

    def timed_infer(*args: Any) -> Any:
        began = time.perf_counter()
        try:
            return infer(*args)
        finally:
            phases["infer_meta"] = time.perf_counter() - began

    def timed_run(self: Any, client: Any) -> None:
        began = time.perf_counter()
        try:
            run(self, client)
        finally:
            phases["partitions"] = time.perf_counter() - began

    maprun._infer_meta, maprun.MapRun.run = timed_infer, timed_run  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        frame = dd.read_csv(str(data / "*.csv"), blocksize="16MB")
        scored = daskrun.map_partitions(str(script), frame)
        began = time.perf_counter()
        if write:
            daskrun.map_run(scored).write(str(out), file_name="scores.csv")
        else:
            out.mkdir(parents=True, exist_ok=True)
            scored.to_csv(str(out / "scores.csv"), single_file=True, index=False)
        phases["write"] = time.perf_counter() - began
        phases["total"] = time.perf_counter() - start
    finally:
        maprun._infer_meta, maprun.MapRun.run = infer, run  # type: ignore[method-assign]
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import dask.config
    from distributed import Client

    data = w3_data(args.mb)
    paths = ("step", "map-write", "map-to-csv")
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp, "score.py")
        script.write_text(W3_SCRIPT)
        with (
            dask.config.set({"daskrun.runs-dir": str(Path(tmp, "runs"))}),
            _local_cluster() as cluster,
            Client(cluster) as client,
        ):
            for n in range(args.repeat):
                for path in paths:  # in rotation: drifts hit every path alike
                    out = Path(tmp, f"{path}-{n}")
                    if path == "step":
                        figures = _step(client, data, script, out)
                    else:
                        figures = _map(data, script, out, path == "map-write")
                    runs[path].append({k: round(v, 2) for k, v in figures.items()})
                    print(f"{path}: {runs[path][-1]}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
    medians = {p: statistics.median(r["total"] for r in runs[p]) for p in paths}
    ratios = {p: round(medians[p] / medians["step"], 2) for p in paths}
    print(f"medians: {medians}; ratio to the step: {ratios}")
    target = REPO / "benchmarks" / "results" / "map-partitions-w3-same-cluster.json"
    target.write_text(
        json.dumps(
            {
                "cores": os.cpu_count(),
                "mb": args.mb,
                "repeat": args.repeat,
                "runs": runs,
                "median_seconds": medians,
                "ratio_to_step": ratios,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {target}")


if __name__ == "__main__":
    main()
