"""W2 in two stages: PNG decoding as ``preprocess()``, the Keras model as ``run()``.

The same work, MNIST-like 28×28 PNGs scored by the demo's Keras CNN
(bench_workloads.py's W2, data made locally, nothing downloaded), as two
ParallelRunSteps on daskrun's local cluster of ``--processes`` worker
processes, each in a fresh process timed from its start to its exit:

- ``one-stage``: ``run()`` decodes its mini-batch's PNGs and predicts them,
  in one worker process: the process that holds the accelerator, as on a
  one-GPU machine, decoding and predicting in turn;
- ``one-stage-all``: the same in every worker process (each loads the
  model in ``init()``), which only a CPU-only machine can do;
- ``two-stage``: ``preprocess()`` decodes the PNGs into one ``uint8`` array
  on the CPU pool, and ``run()`` predicts it on the run pool (one process,
  ``daskrun.preprocess.run-workers``; the only one that loads the model), so
  decoding overlaps the model, at most ``daskrun.preprocess.ahead``
  mini-batches ahead.

Both outputs must be identical. The tools run in rotation (``--repeat``
times, 3 by default: drifts hit both alike); the medians are printed and
saved with every run in ``benchmarks/results/two-stage.json``
(``two-stage-quick.json`` with ``--quick``). Usage::

    python benchmarks/bench_two_stage.py --quick    # 2,000 images
    python benchmarks/bench_two_stage.py            # 20,000 images
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench-two-stage"
MNIST = REPO / "examples" / "mnist"
TOOLS = ("one-stage", "one-stage-all", "two-stage")

# what both scripts share: the model loaded in init(), TensorFlow imported
# there (a CPU worker of the two-stage step, which skips init(), never
# imports it), one thread each
COMMON = """
import os

import numpy as np
from PIL import Image

MODEL = {model!r}


def init():
    global model
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    model = keras.models.load_model(os.path.join(MODEL, "mnist.keras"))


def decode(mini_batch):
    images = []
    for path in mini_batch:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("L")))
    return [os.path.basename(p) for p in mini_batch], np.stack(images)


def predict(names, images):
    digits = np.asarray(model.predict_on_batch(images)).argmax(axis=1)
    return [f"{{n}}: {{d}}" for n, d in zip(names, digits.tolist())]
"""

ONE_STAGE = """

def run(mini_batch):
    return predict(*decode(mini_batch))
"""

TWO_STAGE = """

def preprocess(mini_batch):
    return decode(mini_batch)


def run(batch):
    return predict(*batch)
"""


def data(n: int) -> tuple[Path, Path]:
    """``n`` PNGs and the trained model, made once under ``CACHE``."""
    sys.path.insert(0, str(MNIST))
    from make_data import make_images
    from train_model import train_model

    images = make_images(CACHE / f"images-{n}", count=n)
    return images, train_model(CACHE / "model")


def child(tool: str, images: str, model: str, out: str, processes: int) -> None:
    """One step, in this (fresh) process."""
    import daskrun

    script = Path(out).with_suffix(".py")
    script.parent.mkdir(parents=True, exist_ok=True)
    body = TWO_STAGE if tool == "two-stage" else ONE_STAGE
    processes = 1 if tool == "one-stage" else processes
    script.write_text(COMMON.format(model=model) + body)
    config = daskrun.ParallelRunConfig(
        entry_script=str(script),
        mini_batch_size=100,
        error_threshold=0,
        output_action="append_row",
        process_count_per_node=processes,
        run_invocation_timeout=600,
    )
    step = daskrun.ParallelRunStep(
        f"w2-{tool}",
        config,
        inputs=[daskrun.Dataset.File.from_files(os.path.join(images, "*.png"))],
        output=out,
    )
    run = step.run()
    run.raise_for_status()
    print(json.dumps({"output": run.output_path}))


def run_tool(tool: str, images: Path, model: Path, processes: int) -> dict[str, Any]:
    out = CACHE / "out" / f"{tool}-{time.time_ns()}"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", tool, str(images), str(model), str(out)]
        + ["--processes", str(processes)],
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{done.stdout}\n{done.stderr}")
    output = json.loads(done.stdout.strip().splitlines()[-1])["output"]
    return {"seconds": round(seconds, 3), "output": Path(output).read_text()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images")
    parser.add_argument("--images", type=int, help="images (default 20,000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--child", nargs=4)
    parser.add_argument("--out", help="results file name in benchmarks/results")
    args = parser.parse_args()
    if args.child:
        child(*args.child, processes=args.processes)
        return
    n = args.images or (2_000 if args.quick else 20_000)
    images, model = data(n)
    runs: dict[str, list[float]] = {t: [] for t in TOOLS}
    outputs: dict[str, str] = {}
    for _ in range(args.repeat):
        for tool in TOOLS:  # interleaved
            result = run_tool(tool, images, model, args.processes)
            runs[tool].append(result["seconds"])
            outputs.setdefault(tool, result["output"])
            assert result["output"] == outputs[tool], f"{tool}: output changed"
            print(f"{tool}: {result['seconds']:.2f} s", flush=True)
    assert len(set(outputs.values())) == 1, "the outputs differ"
    medians = {t: statistics.median(v) for t, v in runs.items()}
    gain = {t: round(medians[t] / medians["two-stage"], 3) for t in TOOLS[:2]}
    print(
        f"W2, {n:,} PNGs, {args.processes} processes, medians of {args.repeat}: "
        f"one stage on the run process {medians['one-stage']:.2f} s, on all "
        f"{medians['one-stage-all']:.2f} s, two stages "
        f"{medians['two-stage']:.2f} s; two stages x{gain['one-stage']:.2f} "
        f"and x{gain['one-stage-all']:.2f} as fast; outputs equal"
    )
    name = args.out or ("two-stage-quick.json" if args.quick else "two-stage.json")
    target = REPO / "benchmarks" / "results" / name
    target.write_text(
        json.dumps(
            {
                "cores": os.cpu_count(),
                "images": n,
                "processes": args.processes,
                "mini_batch_size": 100,
                "repeat": args.repeat,
                "seconds": runs,
                "median_seconds": medians,
                "two_stage_speedup_over": gain,
                "outputs_equal": True,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {target}")


if __name__ == "__main__":
    main()
