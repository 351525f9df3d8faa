"""Core engine overhead: a no-op entry script over many tiny files.

Prints and saves (``benchmarks/results/core.json``):

- wall time of a whole daskrun job (incl. local cluster start) for each size,
- the client process's peak RSS (client + in-process scheduler) for each size,
- the steady-state framework cost per mini-batch: the slope of wall time
  between the two sizes,
- the same work as a plain one-process loop and as hand-written Dask
  (``client.map`` over the same mini-batches, with a WorkerPlugin doing init).

Each measurement runs in a fresh process. Usage::

    python benchmarks/bench_core.py                 # 10,000 and 100,000 files
    python benchmarks/bench_core.py --sizes 1000 10000 --mini-batch-size 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NOOP = "def init():\n    pass\n\ndef run(mini_batch):\n    return mini_batch\n"


def make_files(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i:07d}.txt").write_bytes(b"x")


def child_daskrun(data: Path, script: Path, out: Path, mbs: int, procs: int) -> dict:
    import dask.config

    import daskrun

    with dask.config.set({"daskrun.runs-dir": str(out / "runs")}):
        start = time.perf_counter()
        cfg = daskrun.ParallelRunConfig(
            str(script),
            error_threshold=0,
            output_action="append_row",
            mini_batch_size=mbs,
            process_count_per_node=procs,
        )
        dataset = daskrun.Dataset.File.from_files(str(data))
        step = daskrun.ParallelRunStep(
            "bench-noop", cfg, inputs=[dataset], output=str(out)
        )
        run = step.run()
        wall = time.perf_counter() - start
    assert run.status == "Completed", run.error
    files = dataset.files()  # the list the job used (listed once, cached)
    path_list = sys.getsizeof(files) + sum(sys.getsizeof(f) for f in files)
    return {
        "wall_s": wall,
        "mini_batches": run.mini_batches_total,
        "path_list_mb": path_list / 2**20,
    }


def child_loop(data: Path, mbs: int) -> dict:
    start = time.perf_counter()
    files = sorted(str(p) for p in data.iterdir())
    ns: dict = {}
    exec(NOOP, ns)
    ns["init"]()
    with open(os.devnull, "w") as out:
        for i in range(0, len(files), mbs):
            for line in ns["run"](files[i : i + mbs]):
                out.write(f"{line}\n")
    return {"wall_s": time.perf_counter() - start}


def child_dask(data: Path, mbs: int, procs: int) -> dict:
    from distributed import Client, LocalCluster, WorkerPlugin

    class Init(WorkerPlugin):
        def setup(self, worker):
            ns: dict = {}
            exec(NOOP, ns)
            ns["init"]()
            worker.run_fn = ns["run"]

    def task(batch: list[str]) -> list[str]:
        from distributed import get_worker

        return get_worker().run_fn(batch)

    start = time.perf_counter()
    files = sorted(str(p) for p in data.iterdir())
    batches = [files[i : i + mbs] for i in range(0, len(files), mbs)]
    with (
        LocalCluster(
            n_workers=procs,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(Init())
        futures = client.map(task, batches)
        with open(os.devnull, "w") as out:
            for f in futures:
                for line in f.result():
                    out.write(f"{line}\n")
    return {"wall_s": time.perf_counter() - start}


def run_child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000])
    parser.add_argument("--mini-batch-size", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--tools",
        nargs="+",
        default=["daskrun", "loop", "dask"],
        help="leave out 'dask' for a million files (it takes 10 ms per task)",
    )
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()

    if args.child:
        kind, data, mbs, procs = (
            args.child[0],
            Path(args.child[1]),
            *map(int, args.child[2:4]),
        )
        if kind == "daskrun":
            tmp = Path(tempfile.mkdtemp())
            (tmp / "noop.py").write_text(NOOP)
            result = child_daskrun(data, tmp / "noop.py", tmp / "out", mbs, procs)
        elif kind == "loop":
            result = child_loop(data, mbs)
        else:
            result = child_dask(data, mbs, procs)
        result["peak_rss_mb"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        print(json.dumps(result))
        return

    figures: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "mini_batch_size": args.mini_batch_size,
        "processes": args.processes,
        "runs": {},
    }
    cache = Path(__file__).resolve().parent.parent / ".cache"
    for n in args.sizes:
        data = cache / f"bench-core-{n}"
        if not data.is_dir():  # kept: a million files take minutes to make
            make_files(data.with_suffix(".tmp"), n)
            data.with_suffix(".tmp").rename(data)
        common = [str(data), str(args.mini_batch_size), str(args.processes)]
        row = {tool: run_child(tool, *common) for tool in args.tools}
        figures["runs"][n] = row
        print(
            f"{n:>8} files: "
            + ", ".join(
                f"{tool} {r['wall_s']:.2f} s / {r['peak_rss_mb']:.0f} MB"
                for tool, r in row.items()
            ),
            flush=True,
        )
    small, large = args.sizes
    runs = figures["runs"]
    mb = (large - small) / args.mini_batch_size
    for tool in {"daskrun", "dask"} & set(args.tools):
        slope = (runs[large][tool]["wall_s"] - runs[small][tool]["wall_s"]) / mb
        figures[f"{tool}_ms_per_mini_batch"] = round(1000 * slope, 3)
    figures["daskrun_peak_rss_growth_mb"] = round(
        runs[large]["daskrun"]["peak_rss_mb"] - runs[small]["daskrun"]["peak_rss_mb"], 1
    )
    figures["path_list_growth_mb"] = round(
        runs[large]["daskrun"]["path_list_mb"] - runs[small]["daskrun"]["path_list_mb"],
        1,
    )
    print(
        f"steady-state cost per mini-batch: daskrun "
        f"{figures['daskrun_ms_per_mini_batch']} ms, hand-written Dask "
        f"{figures.get('dask_ms_per_mini_batch', '(not run)')} ms; "
        f"daskrun client peak RSS grows "
        f"{figures['daskrun_peak_rss_growth_mb']} MB from {small} to {large} files "
        f"(the path list itself: {figures['path_list_growth_mb']} MB)"
    )
    out = Path(__file__).with_name("results") / f"core-{small}-{large}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
