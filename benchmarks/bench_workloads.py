"""daskrun against what a user would otherwise write, on the same work.

Workloads (data made locally; nothing downloaded):

- W1: tiny files, a no-op ``run()``, 10 files per mini-batch.
- W2: MNIST-like 28×28 PNGs scored by the demo's Keras CNN, 100 per
  mini-batch, TensorFlow on 1 thread per process.
- W3: CSV files; score = dot product of 10 columns; ``[id, score]`` out as
  CSV; 16 MiB per mini-batch (daskrun's "16MB"), cut alike for every tool.

Tools, each in a fresh process, timed from process start to exit (imports
and cluster start included), in rotation, ``--repeat`` times:

- ``loop``: one process, ``init()`` then ``run()`` over the mini-batches;
- ``pool``: ``multiprocessing.Pool(2)`` with ``init`` as initializer,
  ``imap`` in order;
- ``dask``: hand-written Dask: ``LocalCluster(2)``, a WorkerPlugin for
  ``init``, ``client.map`` over the mini-batches, results gathered in order;
- ``daskrun``: a ParallelRunStep on a local cluster of 2 processes;
- ``daskrun-map`` (W3 only): the Dask user's path, ``dd.read_csv(blocksize=
  "16MB")`` → ``daskrun.map_partitions`` → ``.to_csv(single_file=True)`` on
  ``LocalCluster(2)``.

Prints a table of medians and ratios against the pool (the README's table),
the peak RSS of each tool's client process and of its largest worker, and,
for daskrun, how soon a 100-file job returns its first result. Saves
``benchmarks/results/workloads.json`` (``workloads-quick.json`` with
``--quick``; ``--out NAME`` for another file). Usage::

    python benchmarks/bench_workloads.py --quick   # W2 10k, W3 300 MB: ~5 min
    python benchmarks/bench_workloads.py           # W1 20k, W2 50k, W3 1 GB
    python benchmarks/bench_workloads.py --quick --workloads w3 \
        --tools dask daskrun daskrun-map --out map-partitions-w3-quick.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench-workloads"
MNIST = REPO / "examples" / "mnist"
TOOLS = ("loop", "pool", "dask", "daskrun", "daskrun-map")
W3_ONLY = {"daskrun-map"}

NOOP = "def init():\n    pass\n\n\ndef run(mini_batch):\n    return mini_batch\n"
W3_SCRIPT = """
import numpy as np
import pandas as pd

WEIGHTS = np.linspace(0.1, 1.0, 10)
COLUMNS = [f"c{i}" for i in range(10)]


def init():
    pass


def run(df):
    return pd.DataFrame({"id": df["id"].to_numpy(),
                         "score": df[COLUMNS].to_numpy() @ WEIGHTS})
"""


# --- data -------------------------------------------------------------------


def w1_data(n: int) -> Path:
    folder = CACHE / f"w1-{n}"
    if not folder.is_dir():
        tmp = folder.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (tmp / f"{i:07d}.txt").write_bytes(b"x")
        tmp.rename(folder)
    return folder


def w2_data(n: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(MNIST))
    from make_data import make_images
    from train_model import train_model

    images = make_images(CACHE / f"w2-{n}", count=n)
    return images, train_model(CACHE / "w2-model")


def w3_data(megabytes: int, files: int = 8) -> Path:
    import numpy as np
    import pandas as pd

    folder = CACHE / f"w3-{megabytes}mb"
    if folder.is_dir():
        return folder
    tmp = folder.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    rows = int(megabytes * 1e6 / 100 / files)  # ~100 bytes per row
    rng = np.random.default_rng(0)
    for f in range(files):
        frame = pd.DataFrame(
            rng.random((rows, 10)).round(6), columns=[f"c{i}" for i in range(10)]
        )
        frame.insert(0, "id", np.arange(f * rows, (f + 1) * rows))
        frame.to_csv(tmp / f"part-{f}.csv", index=False)
    tmp.rename(folder)
    return folder


# --- mini-batches, the same for every tool ----------------------------------
# The other tools are written as a user would write them, without daskrun:
# W3's mini-batches are byte ranges cut at line ends, read with pandas.


def csv_ranges(data: Path, size: int = 16 * 2**20) -> list[tuple[str, int, int]]:
    ranges = []
    for path in sorted(data.glob("*.csv")):
        total = path.stat().st_size
        with open(path, "rb") as f:
            start = len(f.readline())  # the header
            while start < total:
                f.seek(min(start + size, total))
                f.readline()
                end = min(f.tell(), total)
                ranges.append((str(path), start, end - start))
                start = end
    return ranges


def mini_batches(workload: str, data: Path) -> list[Any]:
    if workload == "w1":
        files = sorted(str(p) for p in data.iterdir())
        return [files[i : i + 10] for i in range(0, len(files), 10)]
    if workload == "w2":
        files = sorted(str(p) for p in data.glob("*.png"))
        return [files[i : i + 100] for i in range(0, len(files), 100)]
    return csv_ranges(data)


def load_script(workload: str) -> Any:
    import types

    if workload == "w2":
        sys.path.insert(0, str(MNIST))
        import digit_identification as script

        return script
    module = types.ModuleType(f"bench_{workload}")
    exec(NOOP if workload == "w1" else W3_SCRIPT, module.__dict__)
    return module


_script: Any = None


def _init(workload: str, model: str) -> None:
    global _script
    _script = load_script(workload)
    if workload == "w2":
        _script.model = _script.load(model)
    else:
        _script.init()


def _run(batch: Any) -> bytes:
    """One mini-batch, giving the bytes daskrun writes for it: text lines
    (W1, W2) or CSV rows with a header (W3)."""
    if isinstance(batch, tuple):
        import pandas as pd

        path, offset, length = batch
        with open(path, "rb") as f:
            header = f.readline()
            f.seek(offset)
            block = f.read(length)
        frame = pd.read_csv(io.BytesIO(header + block))
        return _script.run(frame).to_csv(index=False).encode()
    return "".join(f"{line}\n" for line in _script.run(batch)).encode()


def _write(out: Path, parts: Any, csv: bool) -> None:
    with open(out, "wb") as f:
        for n, data in enumerate(parts):
            if csv and n:
                data = data.split(b"\n", 1)[1]
            f.write(data)


# --- tools --------------------------------------------------------------------


def tool_loop(workload: str, data: Path, model: str, out: Path) -> None:
    _init(workload, model)
    _write(out, (_run(b) for b in mini_batches(workload, data)), workload == "w3")


def tool_pool(workload: str, data: Path, model: str, out: Path) -> None:
    import multiprocessing

    batches = mini_batches(workload, data)
    with multiprocessing.get_context("spawn").Pool(
        2, initializer=_init, initargs=(workload, model)
    ) as pool:
        _write(out, pool.imap(_run, batches), workload == "w3")


def _local_cluster() -> Any:
    """The cluster of the Dask tools: 2 single-threaded worker processes."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    )


def tool_dask(workload: str, data: Path, model: str, out: Path) -> None:
    from distributed import Client, WorkerPlugin

    class Init(WorkerPlugin):
        def setup(self, worker: Any) -> None:
            _init(workload, model)

    batches = mini_batches(workload, data)
    with _local_cluster() as cluster, Client(cluster) as client:
        client.register_plugin(Init(), name="init")
        futures = client.map(_run, batches, pure=False)
        _write(out, (f.result() for f in futures), workload == "w3")


def tool_daskrun(workload: str, data: Path, model: str, out: Path) -> dict[str, float]:
    import dask.config

    from daskrun import Dataset, Model, ParallelRunConfig, ParallelRunStep, Workspace

    folder = out.parent / f"{out.name}.work"
    folder.mkdir(parents=True, exist_ok=True)
    workspace = None
    if workload == "w2":
        workspace = Workspace.create(folder / "ws")
        Model.register(workspace, model, "mnist")
        config = ParallelRunConfig(
            source_directory=str(MNIST),
            entry_script="digit_identification.py",
            mini_batch_size=100,
            process_count_per_node=2,
        )
        inputs = Dataset.File.from_files(str(data / "*.png"))
    else:
        script = folder / "script.py"
        script.write_text(NOOP if workload == "w1" else W3_SCRIPT)
        config = ParallelRunConfig(
            str(script),
            process_count_per_node=2,
            mini_batch_size=10 if workload == "w1" else "16MB",
            output_format="text" if workload == "w1" else "csv",
        )
        inputs = (
            Dataset.File.from_files(str(data))
            if workload == "w1"
            else Dataset.Tabular.from_delimited_files(str(data))
        )
    with dask.config.set({"daskrun.runs-dir": str(folder / "runs")}):
        step = ParallelRunStep(
            "bench", config, inputs=[inputs], output=str(folder / "out")
        )
        run = step.run(workspace=workspace)
    assert run.status == "Completed", run.error
    os.replace(run.output_path or "", out)
    # seconds from the call to the cluster being up, init() done on every
    # worker and the first result in (job_result.txt)
    result = Path(run.logs_dir, "job_result.txt").read_text().splitlines()
    return {
        key[: -len("_seconds")]: float(value)
        for key, value in (line.split(": ", 1) for line in result)
        if key.endswith("_seconds")
    }


def tool_daskrun_map(workload: str, data: Path, model: str, out: Path) -> None:
    import dask.dataframe as dd
    from distributed import Client

    import daskrun

    assert workload == "w3", "daskrun-map runs W3 only"
    script = out.parent / f"{out.name}.script.py"
    script.write_text(W3_SCRIPT)
    with _local_cluster() as cluster, Client(cluster):
        frame = dd.read_csv(str(data / "*.csv"), blocksize="16MB")
        scored = daskrun.map_partitions(str(script), frame)
        scored.to_csv(str(out), single_file=True, index=False)


# --- driver -------------------------------------------------------------------


class PeakRss:
    """Peak resident memory of this process and of its largest descendant.

    This process's own peak is the kernel's (``VmHWM``, which starts afresh
    at ``exec``, unlike ``ru_maxrss``, which keeps the launching process's
    peak). Worker processes are sampled every 20 ms, alike for every tool.
    """

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.workers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for proc in self.me.children(recursive=True):
                try:
                    self.workers = max(self.workers, proc.memory_info().rss)
                except psutil.Error:
                    pass

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        status = Path("/proc/self/status").read_text()
        hwm_kb = int(status.split("VmHWM:")[1].split()[0])
        return {
            "client_rss_mb": round(hwm_kb / 1024),
            "workers_rss_mb": round(self.workers / 2**20),
        }


def child(tool: str, workload: str, data: str, model: str, out: str) -> None:
    # run the tool from the module imported by name (not __main__), so that
    # pool and Dask workers find its functions by reference
    import bench_workloads

    peak = PeakRss()
    timings = getattr(bench_workloads, f"tool_{tool.replace('-', '_')}")(
        workload, Path(data), model, Path(out)
    )
    print(json.dumps({**peak.stop(), **({"timings": timings} if timings else {})}))


def run_tool(tool: str, workload: str, data: Path, model: str) -> dict[str, Any]:
    """One run in a fresh process, timed from its start to its exit."""
    out = CACHE / "out" / f"{workload}-{tool}.out"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            tool,
            workload,
            str(data),
            model,
            str(out),
        ],
        capture_output=True,
        text=True,
        # this checkout's daskrun, not whichever one is installed
        env=dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(REPO)]),
        ),
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{workload} {tool} failed:\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "seconds": round(seconds, 2),
        **figures,
        "output_bytes": out.stat().st_size,
    }


def first_result(repeat: int) -> dict[str, Any]:
    """Target 5: a 100-file job's first result, from the call, without the
    user's init() (the time init() held the workers)."""
    data = w1_data(100)
    runs = [run_tool("daskrun", "w1", data, "")["timings"] for _ in range(repeat)]
    for t in runs:
        t["first_result_without_init"] = round(
            t["first_result"] - (t["init_done"] - t["cluster_ready"]), 2
        )
    return {
        "runs": runs,
        "median": {
            k: statistics.median(t[k] for t in runs)
            for k in ("cluster_ready", "first_result", "first_result_without_init")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["w1", "w2", "w3"])
    parser.add_argument("--tools", nargs="+", default=list(TOOLS))
    parser.add_argument("--child", nargs=5)
    parser.add_argument("--out", help="results file name in benchmarks/results")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sizes = {
        "w1": 20_000,
        "w2": 10_000 if args.quick else 50_000,
        "w3": 300 if args.quick else 1000,
    }
    results: dict[str, Any] = {}
    for workload in args.workloads:
        model = ""
        if workload == "w1":
            data = w1_data(sizes["w1"])
        elif workload == "w2":
            data, model_path = w2_data(sizes["w2"])
            model = str(model_path)
        else:
            data = w3_data(sizes["w3"])
        tools = [t for t in args.tools if workload == "w3" or t not in W3_ONLY]
        runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
        for _ in range(args.repeat):
            for tool in tools:  # in rotation: drifts hit every tool alike
                runs[tool].append(run_tool(tool, workload, data, model))
                print(
                    f"{workload} {tool}: {runs[tool][-1]['seconds']:.2f} s", flush=True
                )
        sizes_out = {t: {r["output_bytes"] for r in runs[t]} for t in tools}
        medians = {t: statistics.median(r["seconds"] for r in runs[t]) for t in tools}
        results[workload] = {
            "size": sizes[workload],
            "runs": runs,
            "median_seconds": medians,
            "ratio_to_pool": {t: round(medians[t] / medians["pool"], 2) for t in tools}
            if "pool" in medians
            else {},
            "peak_rss_mb": {
                t: {
                    "client": max(r["client_rss_mb"] for r in runs[t]),
                    "workers": max(r["workers_rss_mb"] for r in runs[t]),
                }
                for t in tools
            },
            "output_sizes": {t: sorted(v) for t, v in sizes_out.items()},
        }
    first = (
        first_result(args.repeat)
        if "daskrun" in args.tools and "w1" in args.workloads
        else None
    )
    table = markdown(results, args.tools)
    print("\n" + table)
    if first:
        print(
            "\n100-file job, median seconds from the call: cluster up "
            f"{first['median']['cluster_ready']}, first result "
            f"{first['median']['first_result']} "
            f"({first['median']['first_result_without_init']} without init())"
        )
    name = args.out or ("workloads-quick.json" if args.quick else "workloads.json")
    target = REPO / "benchmarks" / "results" / name
    target.write_text(
        json.dumps(
            {
                "cores": os.cpu_count(),
                "quick": args.quick,
                "repeat": args.repeat,
                "results": results,
                "first_result": first,
                "table": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {target}")


def markdown(results: dict[str, Any], tools: list[str]) -> str:
    """The README's table: median seconds, and the ratio to the pool."""
    names = {
        "loop": "1-process loop",
        "pool": "`Pool(2)`",
        "dask": "hand-written Dask",
        "daskrun": "daskrun",
        "daskrun-map": "`daskrun.map_partitions`",
    }
    what = {
        "w1": "W1: {:,} tiny files, no-op",
        "w2": "W2: {:,} PNGs, Keras CNN",
        "w3": "W3: {} MB CSV, dot product",
    }
    lines = [
        "| workload | " + " | ".join(names[t] for t in tools) + " |",
        "|---" * (len(tools) + 1) + "|",
    ]
    for workload, r in results.items():
        cells = []
        for t in tools:
            if t not in r["median_seconds"]:  # a W3-only tool
                cells.append("–")
                continue
            cell = f"{r['median_seconds'][t]:.2f} s"
            if r["ratio_to_pool"] and t != "pool":
                cell += f" ({r['ratio_to_pool'][t]}×)"
            cells.append(cell)
        label = what[workload].format(r["size"])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
