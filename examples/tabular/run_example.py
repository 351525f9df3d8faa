"""Score tabular data with a scikit-learn model: CSV and Parquet in, text,
CSV-with-header and Parquet out.

Makes iris-like measurements from scikit-learn's shipped iris data (nothing
is downloaded), trains a logistic regression, registers it in a workspace,
and runs ``iris_score.py`` three times:

1. CSV files in, ParallelRunStep's ``append_row`` text out (no header),
2. CSV files in, CSV with a header out,
3. Parquet files (several row groups each) in, Parquet out.

Each output is read back with pandas and checked against the input rows.

Run it::

    python examples/tabular/run_example.py --dir daskrun-tabular --rows 200000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

from daskrun import (
    Dataset,
    Model,
    ParallelRunConfig,
    ParallelRunStep,
    Workspace,
)

HERE = Path(__file__).resolve().parent
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def make_data(folder: Path, rows: int, files: int = 4, seed: int = 0) -> Path:
    """``files`` CSV and ``files`` Parquet files of iris-like rows with an
    ``id`` key; Parquet files get row groups of 10,000 rows."""
    from sklearn.datasets import load_iris

    iris = load_iris()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(iris.data), rows)
    noise = rng.normal(0, 0.05, (rows, 4))
    frame = pd.DataFrame(iris.data[picks] + noise, columns=FEATURES).round(3)
    frame.insert(0, "id", np.arange(rows))
    for kind in ("csv", "parquet"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        piece = frame.iloc[lo:hi]
        piece.to_csv(folder / "csv" / f"part-{n}.csv", index=False)
        piece.to_parquet(
            folder / "parquet" / f"part-{n}.parquet", index=False, row_group_size=10_000
        )
    return folder


def train(path: Path) -> Path:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    iris = load_iris(as_frame=True)
    names = np.array(iris.target_names)[iris.target]
    features = iris.data.set_axis(FEATURES, axis=1)
    model = LogisticRegression(max_iter=500).fit(features, names)
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="daskrun-tabular")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    started = time.perf_counter()

    ws = Workspace.create(root / "workspace")
    data = make_data(root / "data", args.rows)
    if "iris" not in ws.models:
        Model.register(ws, train(root / "models" / "iris.joblib"), "iris")

    jobs = [
        ("iris-text", Dataset.Tabular.from_delimited_files(str(data / "csv")), "text"),
        ("iris-csv", Dataset.Tabular.from_delimited_files(str(data / "csv")), "csv"),
        (
            "iris-parquet",
            Dataset.Tabular.from_parquet_files(str(data / "parquet")),
            "parquet",
        ),
    ]
    for name, dataset, output_format in jobs:
        config = ParallelRunConfig(
            source_directory=str(HERE),
            entry_script="iris_score.py",
            mini_batch_size="256KB",
            error_threshold=0,
            output_action="append_row",
            output_format=output_format,
            process_count_per_node=args.processes,
            logging_level="INFO",
        )
        step = ParallelRunStep(
            name=name,
            parallel_run_config=config,
            inputs=[dataset],
            output=str(root / "out" / name),
            arguments=["--model_name", "iris"],
        )
        run = step.run(workspace=ws, show_output=True)
        run.raise_for_status()
        if output_format == "text":
            df = pd.read_csv(
                run.output_path, sep=" ", header=None, names=["id", "species", "p"]
            )
        elif output_format == "csv":
            df = pd.read_csv(run.output_path)
        else:
            df = pd.read_parquet(run.output_path)
        assert len(df) == args.rows and df["id"].tolist() == list(range(args.rows))
        print(f"{name}: {len(df)} rows in {run.output_path}")
        print(df.head(3).to_string(index=False))
        print(f"logs: {run.logs_dir}\n")
    print(f"tabular example finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
