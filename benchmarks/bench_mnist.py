"""Images per second of the MNIST demo's inference step.

Scores the demo's MNIST-like PNGs with its Keras model and entry script
(``examples/mnist``) through a ParallelRunStep with 1 and with 2 worker
processes, and, for comparison, with a plain one-process loop over the same
entry script. Each measurement runs in a fresh process. Prints and saves
``benchmarks/results/mnist.json``:

- ``wall_s``: the whole step (local cluster start, TensorFlow import and
  model load in every worker, scoring, output assembly),
- ``images_per_s``: images / ``wall_s``,
- ``in_run_images_per_s``: images / seconds spent inside ``run()`` per
  worker, summed over workers (throughput once workers are up).

Usage::

    python benchmarks/bench_mnist.py        # 10,000 images, 100 per mini-batch
    python benchmarks/bench_mnist.py --images 2000 --mini-batch-size 50
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "mnist"


def child_daskrun(data: Path, models: Path, processes: int, mbs: int) -> dict:
    import dask.config

    from daskrun import Dataset, Model, ParallelRunConfig, ParallelRunStep, Workspace

    ws = Workspace.create(Path(tempfile.mkdtemp()) / "ws")
    Model.register(ws, models, "mnist")
    with dask.config.set({"daskrun.runs-dir": str(ws.runs_dir)}):
        step = ParallelRunStep(
            "bench-mnist",
            ParallelRunConfig(
                source_directory=str(EXAMPLE),
                entry_script="digit_identification.py",
                mini_batch_size=mbs,
                process_count_per_node=processes,
            ),
            inputs=[Dataset.File.from_files(str(data / "*.png"))],
            output=tempfile.mkdtemp(),
        )
        start = time.perf_counter()
        run = step.run(workspace=ws)
        wall = time.perf_counter() - start
    assert run.status == "Completed", run.error
    seconds: dict[str, float] = {}
    report = Path(run.logs_dir) / "sys/job_report/processed_mini-batches.csv"
    with open(report) as f:
        for row in csv.DictReader(f):
            seconds[row["worker"]] = seconds.get(row["worker"], 0.0) + float(
                row["seconds"]
            )
    images = run.items_succeeded
    return {
        "tool": f"daskrun, {processes} process{'es' if processes > 1 else ''}",
        "images": images,
        "wall_s": round(wall, 2),
        "images_per_s": round(images / wall, 1),
        "in_run_images_per_s": round(
            sum(images / len(seconds) / s for s in seconds.values()), 1
        ),
    }


def child_loop(data: Path, models: Path, mbs: int) -> dict:
    start = time.perf_counter()
    sys.path.insert(0, str(EXAMPLE))
    import digit_identification as script

    script.model = script.load(models)
    files = sorted(str(p) for p in data.glob("*.png"))
    ready = time.perf_counter()
    lines = 0
    for i in range(0, len(files), mbs):
        lines += len(script.run(files[i : i + mbs]))
    end = time.perf_counter()
    return {
        "tool": "plain loop, 1 process",
        "images": lines,
        "wall_s": round(end - start, 2),
        "images_per_s": round(lines / (end - start), 1),
        "in_run_images_per_s": round(lines / (end - ready), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--mini-batch-size", type=int, default=100)
    parser.add_argument("--child", nargs="*")
    args = parser.parse_args()
    if args.child:
        kind, data, models, procs = args.child
        mbs = args.mini_batch_size
        result = (
            child_loop(Path(data), Path(models), mbs)
            if kind == "loop"
            else child_daskrun(Path(data), Path(models), int(procs), mbs)
        )
        print(json.dumps(result))
        return
    sys.path.insert(0, str(EXAMPLE))
    from make_data import make_images
    from train_model import train_model

    cache = REPO / ".cache" / "bench-mnist"
    data = make_images(cache / f"images-{args.images}", count=args.images)
    models = train_model(cache / "model")
    results = []
    for kind, procs in (("loop", 1), ("daskrun", 1), ("daskrun", 2)):
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--mini-batch-size",
                str(args.mini_batch_size),
                "--child",
                kind,
                str(data),
                str(models),
                str(procs),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result))
    out = REPO / "benchmarks" / "results" / "mnist.json"
    out.write_text(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "images": args.images,
                "mini_batch_size": args.mini_batch_size,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
