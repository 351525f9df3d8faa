"""daskrun against what a user would otherwise write, on the same work.

Workloads (data made locally; nothing downloaded):

- W1: tiny files, a no-op ``run()``, 10 files per mini-batch.
- W2: MNIST-like 28×28 PNGs scored by the demo's Keras CNN, 100 per
  mini-batch, TensorFlow on 1 thread per process.
- W3: CSV files; score = dot product of 10 columns; ``[id, score]`` out as
  CSV; 16 MiB per mini-batch (daskrun's "16MB"), cut alike for every tool.
- W4: a two-step pipeline over W2's images: step 1 writes a table of
  features of each 100 images (28 row means per image, one CSV file per
  mini-batch), step 2 scores the tables (a dot product), 10 files per
  mini-batch; daskrun runs it as a ``Pipeline`` with ``PipelineData``.

Tools, each in a fresh process, timed from process start to exit (imports
and cluster start included), in rotation, ``--repeat`` times:

- ``loop``: one process, ``init()`` then ``run()`` over the mini-batches;
- ``pool``: ``multiprocessing.Pool(2)`` with ``init`` as initializer,
  ``imap`` in order;
- ``dask``: hand-written Dask: ``LocalCluster(2)``, a WorkerPlugin for
  ``init``, ``client.map`` over the mini-batches, results gathered in order;
- ``pool-arrow``: the pool, writing W3's CSV with Arrow's writer, as
  daskrun does (the other tools write with pandas, as a user would);
- ``daskrun``: a ParallelRunStep on a local cluster of 2 processes, its
  input given as a folder (or a glob);
- ``daskrun-list``: the same, its input given as a list of file paths;
- ``daskrun-map`` (W3 only): the Dask user's path, ``dd.read_csv(blocksize=
  "16MB")`` → ``daskrun.map_partitions`` → ``.to_csv(single_file=True)`` on
  ``LocalCluster(2)``;
- ``daskrun-map-write`` (W3 only): the same, its result written as a step
  writes its output: ``daskrun.map_run(scored).write(folder)`` (Arrow's CSV
  writer on each worker, parts assembled once);
- ``daskrun-cluster`` (W3 only): the step of ``daskrun``, on the map tools'
  ``LocalCluster(2)`` (``compute_target=client``), to compare the map path
  with the step on the same cluster: daskrun's own local cluster starts and
  closes faster than a default ``LocalCluster`` (no dashboard until asked,
  workers that exit at once).

Prints a table of medians and ratios against the pool (the README's table),
the peak RSS of each tool's client process and of its largest worker, and,
for daskrun, how soon a 100-file job returns its first result. Saves
``benchmarks/results/workloads.json`` (``workloads-quick.json`` with
``--quick``; ``--out NAME`` for another file). Usage::

    python benchmarks/bench_workloads.py --quick   # W2 10k, W3 300 MB: ~5 min
    python benchmarks/bench_workloads.py           # W1 20k, W2 50k, W3 1 GB
    python benchmarks/bench_workloads.py --quick --auto-grid --workloads w1 w3 \
        --repeat 1 --scale 0.1     # "auto" beside a grid: auto-grid.json
    python benchmarks/bench_workloads.py --quick --workloads w3 \
        --tools dask daskrun daskrun-map --out map-partitions-w3-quick.json
    python benchmarks/bench_workloads.py --quick --workloads w3 --tools \
        daskrun-cluster daskrun-map-write daskrun daskrun-map \
        --out map-partitions-w3-write.json

Before and after a change, interleaved in one run: ``--before TREE`` adds,
for daskrun, daskrun-list and daskrun-map, ``TOOL@before``: the same tool
with the daskrun of ``TREE`` (a checkout of the earlier code, e.g. ``git
worktree add /tmp/before REV``), run in rotation with the others::

    python benchmarks/bench_workloads.py --quick --workloads w1 w2 w3 \
        --tools pool daskrun daskrun-list --before /tmp/before --out before-after.json
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
TOOLS = (
    "loop",
    "pool",
    "pool-arrow",
    "dask",
    "daskrun",
    "daskrun-list",
    "daskrun-map",
    "daskrun-map-write",
    "daskrun-cluster",
)
W3_ONLY = {"daskrun-map", "daskrun-map-write", "daskrun-cluster"}
BEFORE = ""  # --before: the earlier checkout's path
# the tools --before runs on the earlier code too (the others are new)
BEFORE_TOOLS = {"daskrun", "daskrun-list", "daskrun-map"}

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


# W4: step 1, features of each image (its 28 row means), one CSV file per
# mini-batch in the step's output folder; step 2, a score of each row
W4_FEATURES = """
import os

import numpy as np
import pandas as pd
from PIL import Image


def init():
    pass


def run(mini_batch):
    rows = [np.asarray(Image.open(p), dtype=np.float32).mean(axis=1)
            for p in mini_batch]
    frame = pd.DataFrame(rows, columns=[f"f{i}" for i in range(28)])
    frame.insert(0, "file", [os.path.basename(p) for p in mini_batch])
    out = os.path.join(os.environ["DASKRUN_OUTPUT_PATH"],
                       os.path.basename(mini_batch[0]) + ".csv")
    frame.to_csv(out, index=False, float_format="%.4f")
    return list(frame["file"])
"""
W4_SCORE = """
import numpy as np
import pandas as pd

WEIGHTS = np.linspace(-1.0, 1.0, 28)


def init():
    pass


def run(mini_batch):
    lines = []
    for path in mini_batch:
        frame = pd.read_csv(path)
        scores = frame[[f"f{i}" for i in range(28)]].to_numpy() @ WEIGHTS
        lines += [f"{f} {s:.4f}" for f, s in zip(frame["file"], scores)]
    return lines
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

    model = train_model(CACHE / "w2-model")
    if n <= LINKED_FROM:
        return make_images(CACHE / f"w2-{n}", count=n), model
    return w2_links(
        n, make_images(CACHE / f"w2-{LINKED_FROM}", count=LINKED_FROM)
    ), model


# W2 beyond this many images: hard links to these under distinct names
# (issue 29 measured 200,000 so: the same images ×20), made once and kept
LINKED_FROM = 10_000


def w2_links(n: int, images: Path) -> Path:
    """``n`` PNGs named ``<i>.png``: image ``i % LINKED_FROM`` under a
    name of its own, as hard links (no copy of the bytes)."""
    folder = CACHE / f"w2-{n}-links"
    if folder.is_dir():
        return folder
    tmp = folder.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = tmp / f"{i}.png"
        if not target.exists():
            os.link(images / f"{i % LINKED_FROM}.png", target)
    tmp.rename(folder)
    return folder


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

    if workload in ("w4-features", "w4-score"):
        module = types.ModuleType(workload)
        exec(W4_FEATURES if workload == "w4-features" else W4_SCORE, module.__dict__)
        return module
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


def _run_arrow(batch: Any) -> bytes:
    """:func:`_run`, writing W3's CSV with Arrow's writer."""
    if not isinstance(batch, tuple):
        return _run(batch)
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pacsv

    path, offset, length = batch
    with open(path, "rb") as f:
        header = f.readline()
        f.seek(offset)
        block = f.read(length)
    frame = _script.run(pd.read_csv(io.BytesIO(header + block)))
    buf = io.BytesIO()
    pacsv.write_csv(
        pa.Table.from_pandas(frame, preserve_index=False),
        buf,
        pacsv.WriteOptions(quoting_style="none"),
    )
    return buf.getvalue()


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


def _features(batch: list[str], folder: str) -> str:
    """W4's step 1 on one mini-batch, as daskrun runs it: its CSV file in
    ``folder``."""
    os.environ["DASKRUN_OUTPUT_PATH"] = folder
    _script.run(batch)
    return os.path.basename(batch[0]) + ".csv"


def w4_passes(data: Path, out: Path, mapper: Any, init: Any) -> None:
    """W4 as two passes of ``mapper(function, items)`` (in order), each
    after ``init(workload)``: features into a folder, then scores."""
    import functools

    folder = out.parent / f"{out.name}.features"
    folder.mkdir(parents=True, exist_ok=True)
    init("w4-features")
    images = mini_batches("w2", data)
    names = list(mapper(functools.partial(_features, folder=str(folder)), images))
    init("w4-score")
    tables = sorted(str(folder / n) for n in names)
    batches = [tables[i : i + 10] for i in range(0, len(tables), 10)]
    _write(out, mapper(_run, batches), False)


def tool_loop(workload: str, data: Path, model: str, out: Path) -> None:
    if workload == "w4":
        w4_passes(data, out, map, lambda w: _init(w, model))
        return
    _init(workload, model)
    _write(out, (_run(b) for b in mini_batches(workload, data)), workload == "w3")


def tool_pool(
    workload: str, data: Path, model: str, out: Path, arrow: bool = False
) -> None:
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    if workload == "w4":
        pools = []

        def init(which: str) -> None:  # a pool per pass, as two scripts
            pools.append(spawn.Pool(2, initializer=_init, initargs=(which, model)))

        try:
            w4_passes(data, out, lambda f, items: pools[-1].imap(f, items), init)
        finally:
            for pool in pools:
                pool.close()
                pool.join()
        return
    batches = mini_batches(workload, data)
    with spawn.Pool(2, initializer=_init, initargs=(workload, model)) as pool:
        _write(out, pool.imap(_run_arrow if arrow else _run, batches), workload == "w3")


def tool_pool_arrow(workload: str, data: Path, model: str, out: Path) -> None:
    tool_pool(workload, data, model, out, arrow=True)


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
        def __init__(self, which: str):
            self.which = which

        def setup(self, worker: Any) -> None:
            _init(self.which, model)

    batches = [] if workload == "w4" else mini_batches(workload, data)
    with _local_cluster() as cluster, Client(cluster) as client:
        if workload == "w4":

            def init(which: str) -> None:
                client.register_plugin(Init(which), name=which)

            def mapper(f: Any, items: list[Any]) -> Any:
                return (r.result() for r in client.map(f, items, pure=False))

            w4_passes(data, out, mapper, init)
            return
        client.register_plugin(Init(workload), name="init")
        futures = client.map(_run, batches, pure=False)
        _write(out, (f.result() for f in futures), workload == "w3")


def tool_daskrun(
    workload: str, data: Path, model: str, out: Path, as_list: bool = False
) -> dict[str, float]:
    import dask.config

    from daskrun import Dataset, Model, ParallelRunConfig, ParallelRunStep, Workspace

    folder = out.parent / f"{out.name}.work"
    folder.mkdir(parents=True, exist_ok=True)
    if workload == "w4":
        with dask.config.set({"daskrun.runs-dir": str(folder / "runs")}):
            return w4_pipeline(data, folder, out, as_list)
    workspace = None
    pattern = {"w1": "*", "w2": "*.png", "w3": "*.csv"}[workload]
    given: Any = sorted(str(p) for p in data.glob(pattern)) if as_list else None
    if workload == "w2":
        workspace = Workspace.create(folder / "ws")
        Model.register(workspace, model, "mnist")
        config = ParallelRunConfig(
            source_directory=str(MNIST),
            entry_script="digit_identification.py",
            mini_batch_size=_grid("MINI_BATCH_SIZE", 100),
            process_count_per_node=_grid("PROCESSES", 2),
        )
        inputs = Dataset.File.from_files(given or str(data / pattern))
    else:
        script = folder / "script.py"
        script.write_text(NOOP if workload == "w1" else W3_SCRIPT)
        config = ParallelRunConfig(
            str(script),
            process_count_per_node=_grid("PROCESSES", 2),
            mini_batch_size=_grid(
                "MINI_BATCH_SIZE", 10 if workload == "w1" else "16MB"
            ),
            output_format="text" if workload == "w1" else "csv",
        )
        inputs = (
            Dataset.File.from_files(given or str(data))
            if workload == "w1"
            else Dataset.Tabular.from_delimited_files(given or str(data))
        )
    with dask.config.set({"daskrun.runs-dir": str(folder / "runs")}):
        step = ParallelRunStep(
            "bench", config, inputs=[inputs], output=str(folder / "out")
        )
        run = step.run(workspace=workspace)
    assert run.status == "Completed", run.error
    os.replace(run.output_path or "", out)
    return _timings(run)


def _grid(name: str, default: Any) -> Any:
    """A size the ``--auto-grid`` mode sets for one run (``BENCH_<name>``):
    a number, a byte size or ``auto``; else ``default``."""
    value = os.environ.get(f"BENCH_{name}")
    if value is None:
        return default
    return int(value) if value.isdigit() else value


def tool_daskrun_list(workload: str, data: Path, model: str, out: Path) -> Any:
    return tool_daskrun(workload, data, model, out, as_list=True)


def w4_pipeline(data: Path, folder: Path, out: Path, as_list: bool) -> dict[str, float]:
    """W4 as a daskrun Pipeline: step 1's output folder (PipelineData) is
    step 2's input, on one local cluster."""
    from daskrun import (
        Dataset,
        Experiment,
        ParallelRunConfig,
        ParallelRunStep,
        Pipeline,
        PipelineData,
        Workspace,
    )

    ws = Workspace.create(folder / "ws")
    features = PipelineData("features", datastore=ws.get_default_datastore())
    scripts = []
    for name, body in (("features.py", W4_FEATURES), ("score.py", W4_SCORE)):
        (folder / name).write_text(body)
        scripts.append(str(folder / name))
    images: Any = sorted(str(p) for p in data.glob("*.png")) if as_list else None
    step1 = ParallelRunStep(
        "features",
        ParallelRunConfig(
            scripts[0],
            mini_batch_size=100,
            process_count_per_node=2,
            output_action="summary_only",
        ),
        inputs=[Dataset.File.from_files(images or str(data / "*.png"))],
        output=features,
    )
    step2 = ParallelRunStep(
        "score",
        ParallelRunConfig(scripts[1], mini_batch_size=10, process_count_per_node=2),
        inputs=[features],
        output=str(folder / "out"),
    )
    run = Experiment(ws, "w4").submit(Pipeline(workspace=ws, steps=[step1, step2]))
    assert run.wait_for_completion() == "Completed"
    steps = {r.name: r for r in run.get_steps()}
    os.replace(steps["score"].output_path or "", out)
    return _timings(steps["features"])


def _timings(run: Any) -> dict[str, float]:
    """Seconds from the call to the cluster being up, init() done on every
    worker, the first and the last result in, and the job's end (``job``);
    the forecast of the job's seconds made at 10 % (``forecast_at_10pct``),
    where its pilot ended (job_result.txt)."""
    result = dict(
        line.split(": ", 1)
        for line in Path(run.logs_dir, "job_result.txt").read_text().splitlines()
    )
    found = {
        key[: -len("_seconds")]: float(value)
        for key, value in result.items()
        if key.endswith("_seconds")
    }
    found["job"] = float(result["seconds"])
    if "forecast_seconds_at_10pct" in result:
        found["forecast_at_10pct"] = float(result["forecast_seconds_at_10pct"])
    return found


def forecast_errors(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Each daskrun tool's median forecast error: the forecast made at 10 %
    over the job's actual seconds, less 1 (+0.1: 10 % too long)."""
    errors = {}
    for tool, tried in runs.items():
        pairs = [
            r["timings"] for r in tried if "forecast_at_10pct" in r.get("timings", {})
        ]
        if pairs:
            errors[tool] = round(
                statistics.median(t["forecast_at_10pct"] / t["job"] - 1 for t in pairs),
                3,
            )
    return errors


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


def tool_daskrun_cluster(workload: str, data: Path, model: str, out: Path) -> Any:
    from distributed import Client

    from daskrun import Dataset, ParallelRunConfig, ParallelRunStep

    assert workload == "w3", "daskrun-cluster runs W3 only"
    folder = out.parent / f"{out.name}.work"
    script = folder / "script.py"
    folder.mkdir(parents=True, exist_ok=True)
    script.write_text(W3_SCRIPT)
    with _local_cluster() as cluster, Client(cluster) as client:
        config = ParallelRunConfig(
            str(script),
            mini_batch_size="16MB",
            output_format="csv",
            compute_target=client,
        )
        inputs = Dataset.Tabular.from_delimited_files(str(data))
        with dask_config({"daskrun.runs-dir": str(folder / "runs")}):
            step = ParallelRunStep(
                "bench", config, inputs=[inputs], output=str(folder / "out")
            )
            run = step.run()
    assert run.status == "Completed", run.error
    os.replace(run.output_path or "", out)
    return _timings(run)


def dask_config(settings: dict[str, Any]) -> Any:
    import dask.config

    return dask.config.set(settings)


def tool_daskrun_map_write(workload: str, data: Path, model: str, out: Path) -> None:
    import dask.dataframe as dd
    from distributed import Client

    import daskrun

    assert workload == "w3", "daskrun-map-write runs W3 only"
    script = out.parent / f"{out.name}.script.py"
    script.write_text(W3_SCRIPT)
    with _local_cluster() as cluster, Client(cluster):
        frame = dd.read_csv(str(data / "*.csv"), blocksize="16MB")
        scored = daskrun.map_partitions(str(script), frame)
        folder = out.parent / f"{out.name}.folder"
        final = daskrun.map_run(scored).write(str(folder), file_name="scores.csv")
        os.replace(final, out)


# --- driver -------------------------------------------------------------------


class WorkerRss:
    """Peak resident memory of the largest descendant of process ``pid``,
    sampled every 100 ms from the driver, alike for every tool: outside the
    measured process, so that sampling takes none of its time (nor its GIL,
    which a client's in-process scheduler needs)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            try:
                procs = self.root.children(recursive=True)
            except psutil.Error:  # the tool has exited
                return
            for proc in procs:
                try:
                    self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.Error:
                    pass

    def stop(self) -> int:
        """The peak, in MB."""
        self._stop.set()
        self._thread.join()
        return round(self.peak / 2**20)


def client_rss_mb() -> int:
    """This process's peak resident memory: the kernel's ``VmHWM``, which
    starts afresh at ``exec``, unlike ``ru_maxrss``, which keeps the
    launching process's peak."""
    status = Path("/proc/self/status").read_text()
    return round(int(status.split("VmHWM:")[1].split()[0]) / 1024)


def child(tool: str, workload: str, data: str, model: str, out: str) -> None:
    # run the tool from the module imported by name (not __main__), so that
    # pool and Dask workers find its functions by reference
    import bench_workloads

    timings = getattr(bench_workloads, f"tool_{tool.replace('-', '_')}")(
        workload, Path(data), model, Path(out)
    )
    figures = {"client_rss_mb": client_rss_mb()}
    print(json.dumps({**figures, **({"timings": timings} if timings else {})}))


def run_tool(
    tool: str,
    workload: str,
    data: Path,
    model: str,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One run in a fresh process, timed from its start to its exit; ``env``
    adds to its environment (``BENCH_*`` sizes, :func:`_grid`)."""
    tool, _, before = tool.partition("@")
    tree = Path(BEFORE) if before else REPO
    out = CACHE / "out" / f"{workload}-{tool}{'-before' if before else ''}.out"
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
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
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # this checkout's daskrun (or --before's), not the one installed
        env=dict(
            os.environ,
            **(env or {}),
            PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(tree)]),
        ),
    )
    workers = WorkerRss(proc.pid)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{workload} {tool} failed:\n{stderr[-3000:]}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    return {
        "seconds": round(seconds, 2),
        **figures,
        "workers_rss_mb": workers.stop(),
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


GRID = {
    "w1": ["1", "10", "100", "1000"],
    "w2": ["1", "10", "100", "1000"],
    "w3": ["1MB", "16MB", "64MB"],
}


def auto_grid(
    workloads: list[str], sizes: dict[str, int], repeat: int
) -> dict[str, Any]:
    """daskrun's wall time with ``"auto"`` sizes beside a grid of hand-picked
    ``mini_batch_size`` × ``process_count_per_node`` (1 or 2); the target
    is auto within 10 % of the grid's best."""
    results: dict[str, Any] = {}
    for workload in workloads:
        model = ""
        if workload == "w1":
            data = w1_data(sizes["w1"])
        elif workload == "w2":
            data, model_path = w2_data(sizes["w2"])
            model = str(model_path)
        else:
            data = w3_data(sizes["w3"])
        cells = [(m, p) for m in GRID[workload] for p in ("1", "2")]
        cells += [("auto", "auto"), ("auto", "2")]
        seconds: dict[str, list[float]] = {f"{m} x {p}": [] for m, p in cells}
        for _ in range(repeat):
            for m, p in cells:  # in rotation: drifts hit every cell alike
                env = {"BENCH_MINI_BATCH_SIZE": m, "BENCH_PROCESSES": p}
                took = run_tool("daskrun", workload, data, model, env)["seconds"]
                seconds[f"{m} x {p}"].append(took)
                print(f"{workload} {m} x {p}: {took:.2f} s", flush=True)
        medians = {k: statistics.median(v) for k, v in seconds.items()}
        grid = {k: v for k, v in medians.items() if not k.startswith("auto")}
        best = min(grid, key=grid.__getitem__)
        results[workload] = {
            "size": sizes[workload],
            "seconds": seconds,
            "median_seconds": medians,
            "best_of_grid": best,
            "auto_to_best": {
                k: round(v / grid[best], 2)
                for k, v in medians.items()
                if k.startswith("auto")
            },
        }
        print(
            f"{workload}: best of grid {best} {grid[best]:.2f} s; auto "
            + ", ".join(
                f"{k}: {medians[k]:.2f} s ({r}x)"
                for k, r in results[workload]["auto_to_best"].items()
            ),
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["w1", "w2", "w3", "w4"])
    parser.add_argument("--tools", nargs="+", default=list(TOOLS))
    parser.add_argument("--child", nargs=5)
    parser.add_argument(
        "--before",
        help="a checkout of earlier code: each daskrun tool also runs as "
        "TOOL@before with its daskrun, in rotation",
    )
    parser.add_argument("--out", help="results file name in benchmarks/results")
    parser.add_argument(
        "--auto-grid",
        action="store_true",
        help="daskrun with mini_batch_size/process_count_per_node 'auto' beside "
        "a grid of hand-picked values; saves auto-grid.json",
    )
    parser.add_argument(
        "--w2-size",
        type=int,
        help="W2's images (default 50,000, 10,000 --quick); beyond 10,000, "
        "hard links to those 10,000 under distinct names, e.g. 200000",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the workloads' sizes (e.g. 0.1 for a reduced grid)",
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.before:
        global BEFORE
        BEFORE = str(Path(args.before).resolve())
        args.tools = [  # side by side: before, after, before, ...
            name
            for t in args.tools
            for name in ([f"{t}@before", t] if t in BEFORE_TOOLS else [t])
        ]
    sizes = {
        name: max(1, int(n * args.scale))
        for name, n in {
            "w1": 20_000,
            "w2": args.w2_size or (10_000 if args.quick else 50_000),
            "w3": 300 if args.quick else 1000,
            "w4": 10_000 if args.quick else 50_000,
        }.items()
    }
    if args.auto_grid:
        workloads = [w for w in args.workloads if w in GRID]
        grid = auto_grid(workloads, sizes, args.repeat)
        target = REPO / "benchmarks" / "results" / (args.out or "auto-grid.json")
        target.write_text(
            json.dumps(
                {
                    "cores": os.cpu_count(),
                    "quick": args.quick,
                    "scale": args.scale,
                    "repeat": args.repeat,
                    "results": grid,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"saved {target}")
        return
    results: dict[str, Any] = {}
    for workload in args.workloads:
        model = ""
        if workload == "w1":
            data = w1_data(sizes["w1"])
        elif workload in ("w2", "w4"):
            data, model_path = w2_data(sizes[workload])
            model = str(model_path)
        else:
            data = w3_data(sizes["w3"])
        tools = [
            t
            for t in args.tools
            if workload == "w3" or t.partition("@")[0] not in W3_ONLY
        ]
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
            "forecast_error": forecast_errors(runs),
        }
        for tool, error in results[workload]["forecast_error"].items():
            print(f"{workload} {tool}: forecast at 10 % off by {error:+.0%}")
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
        "pool-arrow": "`Pool(2)`, Arrow's CSV writer",
        "daskrun": "daskrun",
        "daskrun-list": "daskrun, a list of paths",
        "daskrun-map": "`daskrun.map_partitions`",
        "daskrun-map-write": "`daskrun.map_partitions`, `.write()`",
        "daskrun-cluster": "daskrun on `LocalCluster(2)`",
    }
    what = {
        "w1": "W1: {:,} tiny files, no-op",
        "w2": "W2: {:,} PNGs, Keras CNN",
        "w3": "W3: {} MB CSV, dot product",
        "w4": "W4: {:,} PNGs → features → scores, 2 steps",
    }
    lines = [
        "| workload | "
        + " | ".join(
            names[t.partition("@")[0]] + (" (before)" if "@" in t else "")
            for t in tools
        )
        + " |",
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
