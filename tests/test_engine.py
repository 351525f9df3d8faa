"""The engine end to end, on real worker processes and real files."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster

from daskrun import (
    ConfigError,
    Dataset,
    InputError,
    JobFailedError,
    ParallelRunConfig,
    ParallelRunStep,
)

from .helpers import make_files, run_step, write_script

MARKING_SCRIPT = """
import argparse, os, sys, uuid

def init():
    global markers
    parser = argparse.ArgumentParser()
    parser.add_argument("--markers")
    args, _ = parser.parse_known_args()
    markers = args.markers
    # one file per init() call, named by process id
    open(os.path.join(markers, f"init-{os.getpid()}-{uuid.uuid4().hex}"), "w").close()

def run(mini_batch):
    return [f"{os.path.basename(p)} {open(p).read()}" for p in mini_batch]

def shutdown():
    open(os.path.join(markers, f"shutdown-{os.getpid()}"), "w").close()
"""


def test_file_job_is_complete_ordered_and_inits_once_per_process(
    tmp_path: Path,
) -> None:
    files = make_files(tmp_path / "in", 1000)
    markers = tmp_path / "markers"
    markers.mkdir()
    script = write_script(tmp_path / "src", MARKING_SCRIPT)
    cfg = ParallelRunConfig(
        str(script),
        error_threshold=0,
        output_action="append_row",
        mini_batch_size=7,
        process_count_per_node=2,
    )
    step = ParallelRunStep(
        "files-in-order",
        cfg,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
        arguments=["--markers", str(markers)],
    )
    run = step.run()
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"{p.name} {i}" for i, p in enumerate(files)]
    assert run.mini_batches_total == 143 and run.items_succeeded == 1000
    inits = [m.name.split("-")[1] for m in markers.glob("init-*")]
    assert len(inits) == 2 and len(set(inits)) == 2  # once in each of 2 processes
    assert os.getpid() not in map(int, inits)
    shutdowns = [m.name.split("-")[1] for m in markers.glob("shutdown-*")]
    assert sorted(shutdowns) == sorted(inits)
    # parts are gone once the output is published
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "parallel_run_step.txt"
    ]
    report = pd.read_csv(
        Path(run.logs_dir) / "sys/job_report/processed_mini-batches.csv"
    )
    assert sorted(report["index"]) == list(range(143))
    assert report["items_ok"].sum() == 1000 and (report["tries"] == 1).all()


EXIT_SCRIPT = """
import atexit, os, sys
from daskrun import EntryScript

markers = sys.argv[sys.argv.index("--markers") + 1]


class Teardown:
    def __init__(self, path):
        self.path = path

    # runs when the interpreter frees this module; bound now, as the module's
    # globals may be gone by then
    def __del__(self, open=open):
        open(self.path, "w").close()


held = Teardown(os.path.join(markers, f"teardown-{os.getpid()}"))


def _exit_hook(folder):
    with open(os.path.join(markers, f"exit-{os.getpid()}"), "w") as f:
        f.write(f"{os.path.isdir(folder)}")


def init():
    # a folder inside the worker's own, which a closed worker has removed
    atexit.register(_exit_hook, EntryScript().log_dir)

def run(mini_batch):
    return mini_batch
"""


def test_own_workers_end_after_their_exit_hooks_without_module_teardown(
    tmp_path: Path,
) -> None:
    """daskrun's own workers, once closed, skip freeing their modules one by
    one (0.75 s with TensorFlow), but the script's exit hooks still run, after
    the worker's folder is removed."""
    make_files(tmp_path / "in", 20)
    markers = tmp_path / "markers"
    markers.mkdir()
    script = write_script(tmp_path / "src", EXIT_SCRIPT)
    step = ParallelRunStep(
        "quick-exit",
        ParallelRunConfig(str(script), process_count_per_node=2),
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
        arguments=["--markers", str(markers)],
    )
    run = step.run()
    assert run.status == "Completed", run.error
    exits = sorted(markers.glob("exit-*"))
    assert len(exits) == 2  # the hook ran in both worker processes
    assert all(m.read_text() == "False" for m in exits)  # folders already removed
    assert not list(markers.glob("teardown-*"))


TABULAR_SCRIPT = """
import os, uuid
import pandas as pd

def init():
    pass

def run(df):
    call = uuid.uuid4().hex[:12]
    return pd.DataFrame({"call": call, "file": df["file"], "row": df["row"]})
"""


def _read_rows(path: str) -> pd.DataFrame:
    return pd.read_csv(path, sep=" ", header=None, names=["call", "file", "row"])


def test_csv_mini_batches_never_cross_files(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    sizes = {"a": 500, "b": 200_000, "c": 10, "d": 80_000}  # rows; ~17 bytes each
    folder = tmp_path / "csv"
    folder.mkdir()
    for name, rows in sizes.items():
        pd.DataFrame({"file": name, "row": range(rows), "pad": "xxxxxxxx"}).to_csv(
            folder / f"{name}.csv", index=False
        )
    run = run_step(
        tmp_path,
        TABULAR_SCRIPT,
        Dataset.Tabular.from_delimited_files(str(folder)),
        mini_batch_size="1MB",
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error
    out = _read_rows(run.output_path or "")
    assert len(out) == sum(sizes.values()) == run.items_succeeded
    assert out.groupby("call")["file"].nunique().max() == 1  # never two files
    calls = out.groupby("file")["call"].nunique()
    big_bytes = (folder / "b.csv").stat().st_size
    assert big_bytes > 2 * 2**20
    assert calls["a"] == 1 and calls["c"] == 1
    assert calls["b"] == -(-big_bytes // 2**20) and calls["d"] > 1
    # every row exactly once, in input order
    for name, rows in sizes.items():
        assert out[out["file"] == name]["row"].tolist() == list(range(rows))
    assert out["file"].tolist() == sorted(out["file"].tolist())


def test_parquet_split_by_row_groups(tmp_path: Path, cluster: LocalCluster) -> None:
    path = tmp_path / "data" / "t.parquet"
    path.parent.mkdir()
    table = pa.table({"file": ["t"] * 50_000, "row": list(range(50_000))})
    pq.write_table(table, path, row_group_size=10_000)
    pq.write_table(
        pa.table({"file": ["u"] * 5, "row": list(range(5))}), path.parent / "u.parquet"
    )
    run = run_step(
        tmp_path,
        TABULAR_SCRIPT,
        Dataset.Tabular.from_parquet_files(str(path.parent)),
        mini_batch_size="100KB",
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error
    out = _read_rows(run.output_path or "")
    assert len(out) == 50_005
    assert out.groupby("file")["call"].nunique().to_dict() == {"t": 5, "u": 1}
    assert out["row"].tolist() == list(range(50_000)) + list(range(5))


FAILING_SCRIPT = """
import os

def init():
    pass

def run(mini_batch):
    out = []
    for p in mini_batch:
        if os.path.basename(p).startswith("bad"):
            raise ValueError(f"cannot score {os.path.basename(p)}")
        out.append(os.path.basename(p))
    return out
"""


def _failing_step(
    tmp_path: Path, cluster: LocalCluster, k: int, **kw: object
) -> ParallelRunStep:
    make_files(tmp_path / "in", 20, prefix="ok")
    make_files(tmp_path / "in", k, prefix="bad")  # sorted first: bad00000...
    script = write_script(tmp_path, FAILING_SCRIPT)
    cfg = ParallelRunConfig(
        str(script),
        output_action="append_row",
        mini_batch_size=1,
        run_max_try=1,
        compute_target=cluster,
        **kw,  # type: ignore[arg-type]
    )
    return ParallelRunStep(
        "with-failures",
        cfg,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    )


@pytest.mark.parametrize(
    "threshold, tolerated, exceeded",
    [
        ("error_threshold", 3, 2),
        ("allowed_failed_count", 3, 2),
        ("allowed_failed_percent", 100 * 3 / 23, 100 * 2 / 23),
    ],
)
def test_thresholds_on_a_cluster(
    tmp_path: Path,
    cluster: LocalCluster,
    threshold: str,
    tolerated: float,
    exceeded: float,
) -> None:
    extra = {} if threshold == "error_threshold" else {"error_threshold": -1}
    ok = _failing_step(tmp_path / "ok", cluster, 3, **{threshold: tolerated}, **extra)
    run = ok.run()
    assert run.status == "Completed", run.error
    assert run.items_failed == 3 and run.mini_batches_failed == 3
    failed = pd.read_csv(Path(run.logs_dir) / "sys/job_report/failed_items.csv")
    assert sorted(Path(p).name for p in failed["input"]) == [
        f"bad{i:05d}.txt" for i in range(3)
    ]
    assert failed["error"].str.startswith("ValueError: cannot score bad").all()
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"ok{i:05d}.txt" for i in range(20)]

    bad = _failing_step(tmp_path / "bad", cluster, 3, **{threshold: exceeded}, **extra)
    run = bad.run()
    assert run.status == "Failed"
    assert run.output_path is None
    assert not (tmp_path / "bad" / "out" / "parallel_run_step.txt").exists()
    assert run.error is not None
    assert f"{threshold}=" in run.error
    assert "mini-batches failed" in run.error
    assert "ValueError: cannot score bad0000" in run.error
    assert "files bad0000" in run.error
    with pytest.raises(JobFailedError, match=threshold):
        run.raise_for_status()
    error_file = (Path(run.logs_dir) / "job_error.txt").read_text()
    assert error_file.startswith("ValueError: cannot score bad0000")
    line = (
        FAILING_SCRIPT.splitlines().index(
            '            raise ValueError(f"cannot score {os.path.basename(p)}")'
        )
        + 1
    )
    assert f'{tmp_path / "bad" / "score.py"}", line {line}, in run' in error_file
    assert "raise ValueError" in error_file


RETRY_SCRIPT = """
import os, uuid

def init():
    global tries
    tries = os.environ["TRIES_DIR"]

def run(mini_batch):
    name = os.path.basename(mini_batch[0])
    open(os.path.join(tries, f"{name}.{uuid.uuid4().hex}"), "w").close()
    seen = sum(1 for f in os.listdir(tries) if f.startswith(name + "."))
    if name.startswith("flaky") and seen == 1:
        raise RuntimeError("first try fails")
    if name.startswith("broken"):
        raise RuntimeError("always fails")
    return [name]
"""


def test_retries_are_exactly_once(tmp_path: Path, cluster: LocalCluster) -> None:
    make_files(tmp_path / "in", 5, prefix="good")
    make_files(tmp_path / "in", 1, prefix="flaky")
    make_files(tmp_path / "in", 1, prefix="broken")
    tries = tmp_path / "tries"
    tries.mkdir()
    run = run_step(
        tmp_path,
        RETRY_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "in")),
        error_threshold=1,
        mini_batch_size=1,
        run_max_try=4,
        compute_target=cluster,
        environment_variables={"TRIES_DIR": str(tries)},
    )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == ["flaky00000.txt"] + [f"good{i:05d}.txt" for i in range(5)]
    counts: dict[str, int] = {}
    for f in tries.iterdir():
        key = f.name.split(".txt.")[0]
        counts[key] = counts.get(key, 0) + 1
    assert counts["broken00000"] == 4  # exactly run_max_try
    assert counts["flaky00000"] == 2
    report = pd.read_csv(
        Path(run.logs_dir) / "sys/job_report/processed_mini-batches.csv"
    )
    by_index = report.set_index("index")
    assert by_index.loc[0, "tries"] == 4 and by_index.loc[0, "items_failed"] == 1
    assert "always fails" in by_index.loc[0, "error"]
    assert by_index.loc[1, "tries"] == 2 and by_index.loc[1, "items_ok"] == 1


def test_fewer_and_more_results_are_counted(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    make_files(tmp_path / "in", 10)
    script = write_script(
        tmp_path,
        """
        def init(): pass
        def run(mb):
            if mb[0].endswith("f00000.txt"):
                return ["only one"]          # 2 inputs, 1 result
            return ["x"] * (len(mb) + 1)     # one extra row
        """,
    )
    cfg = ParallelRunConfig(
        str(script),
        error_threshold=1,
        output_action="append_row",
        mini_batch_size=2,
        compute_target=cluster,
    )
    run = ParallelRunStep(
        "counts",
        cfg,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    ).run()
    assert run.status == "Completed", run.error
    assert (run.items_total, run.items_succeeded, run.items_failed) == (10, 9, 1)
    assert run.items_extra == 4
    assert len(Path(run.output_path or "").read_text().splitlines()) == 1 + 4 * 3


def test_summary_only_and_compute_targets(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    make_files(tmp_path / "in", 12)
    script = write_script(
        tmp_path,
        """
        import os
        def init(): pass
        def run(mb):
            assert os.environ["DASKRUN_OUTPUT_PATH"]
            return mb
        """,
    )
    inputs = [Dataset.File.from_files(str(tmp_path / "in"))]
    with Client(cluster) as client:
        for target in (cluster.scheduler_address, client, cluster):
            cfg = ParallelRunConfig(
                str(script),
                output_action="summary_only",
                mini_batch_size=5,
                compute_target=target,
            )
            run = ParallelRunStep("summary", cfg, inputs=inputs).run()
            assert run.status == "Completed" and run.output_path is None
            assert run.items_succeeded == 12 and run.mini_batches_total == 3
        # given clusters and clients are left running
        assert client.status == "running" and len(client.nthreads()) == 2


def test_summary_only_writes_its_own_files_into_a_new_output_folder(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    # run() writes one file per mini-batch into DASKRUN_OUTPUT_PATH, a
    # folder that does not exist yet (a PipelineData's, say)
    make_files(tmp_path / "in", 6)
    script = write_script(
        tmp_path,
        """
        import os
        def init(): pass
        def run(mb):
            folder = os.environ["DASKRUN_OUTPUT_PATH"]
            with open(os.path.join(folder, os.path.basename(mb[0])), "w") as f:
                f.write(" ".join(open(p).read() for p in mb))
            return mb
        """,
    )
    cfg = ParallelRunConfig(
        str(script),
        output_action="summary_only",
        mini_batch_size=2,
        compute_target=cluster,
    )
    out = tmp_path / "not" / "yet"
    run = ParallelRunStep(
        "own-files",
        cfg,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(out),
    ).run()
    assert run.status == "Completed", run.error
    written = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    assert written == {"f00000.txt": "0 1", "f00002.txt": "2 3", "f00004.txt": "4 5"}


def test_script_travels_with_its_source_directory(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    src = tmp_path / "src"
    write_script(src, "FACTOR = 3\n", "helper.py")
    write_script(
        src,
        """
        import sys, helper
        def init():
            global where
            where = __file__
        def run(mb):
            return [f"{helper.FACTOR} {where}" for _ in mb]
        """,
    )
    make_files(tmp_path / "in", 3)
    cfg = ParallelRunConfig(
        "score.py",
        source_directory=str(src),
        output_action="append_row",
        compute_target=cluster,
    )
    run = ParallelRunStep(
        "travels",
        cfg,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    ).run()
    assert run.status == "Completed", run.error
    for line in Path(run.output_path or "").read_text().splitlines():
        factor, where = line.split(" ", 1)
        assert factor == "3"
        # imported from the worker's copy, not from the client's folder
        assert not where.startswith(str(src))


def test_init_failure_fails_the_job_with_the_user_error(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    make_files(tmp_path / "in", 3)
    run = run_step(
        tmp_path,
        "def init():\n    raise OSError('model.pkl not found')\n"
        "def run(mb): return mb\n",
        Dataset.File.from_files(str(tmp_path / "in")),
        compute_target=cluster,
    )
    assert run.status == "Failed"
    assert run.error is not None and "OSError: model.pkl not found" in run.error
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()


def test_step_validation_before_any_task(tmp_path: Path) -> None:
    script = write_script(tmp_path, "def init(): pass\ndef run(mb): return mb\n")
    make_files(tmp_path / "in", 2)
    files = Dataset.File.from_files(str(tmp_path / "in"))
    cfg = ParallelRunConfig(str(script), output_action="append_row")
    with pytest.raises(ConfigError, match="output is required"):
        ParallelRunStep("no-output", cfg, inputs=[files])
    with pytest.raises(ConfigError, match="name='Bad_Name'"):
        ParallelRunStep("Bad_Name", cfg, inputs=[files], output=str(tmp_path))
    with pytest.raises(ConfigError, match="inputs item 'in/' is not a data set"):
        ParallelRunStep("abc", cfg, inputs=["in/"], output=str(tmp_path))
    with pytest.raises(ConfigError, match=r"mini_batch_size='1MB' is not a number"):
        ParallelRunStep(
            "abc",
            ParallelRunConfig(str(script), mini_batch_size="1MB"),
            inputs=[files],
            output=str(tmp_path),
        )
    with pytest.raises(ConfigError, match="reserved"):
        ParallelRunStep(
            "abc",
            cfg,
            inputs=[files],
            output=str(tmp_path),
            arguments=["--run_max_try", "3"],
        )
    # validate=False defers the listing to run(): still before any task
    later = Dataset.File.from_files(str(tmp_path / "gone"), validate=False)
    step = ParallelRunStep("abc", cfg, inputs=[later], output=str(tmp_path / "o"))
    with pytest.raises(InputError, match="gone' matches no files"):
        step.run()
    assert not (tmp_path / "runs").exists()  # no run was started


SIDE_SCRIPT = """
import argparse, os

def init():
    global labels
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels")
    args, _ = parser.parse_known_args()
    labels = dict(line.split() for line in open(args.labels))

def run(mini_batch):
    return [f"{os.path.basename(p)} {labels[os.path.basename(p)]}" for p in mini_batch]
"""


def test_side_input_reaches_every_worker(tmp_path: Path, cluster: LocalCluster) -> None:
    files = make_files(tmp_path / "in", 9)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{p.name} label{i}\n" for i, p in enumerate(files)))
    side = Dataset.File.from_files(str(labels))
    cfg = ParallelRunConfig(
        str(write_script(tmp_path, SIDE_SCRIPT)),
        output_action="append_row",
        mini_batch_size=2,
        compute_target=cluster,
    )
    with pytest.raises(ConfigError, match="not in side_inputs"):
        ParallelRunStep(
            "side",
            cfg,
            inputs=Dataset.File.from_files(str(tmp_path / "in")),
            output=str(tmp_path / "out"),
            arguments=["--labels", side],
        )
    run = ParallelRunStep(
        "side",
        cfg,
        inputs=Dataset.File.from_files(str(tmp_path / "in")),
        output=str(tmp_path / "out"),
        side_inputs=[side],
        arguments=["--labels", side],
    ).run()
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == [f"{p.name} label{i}" for i, p in enumerate(files)]


def test_settings_come_from_dask_config(tmp_path: Path) -> None:
    import dask.config

    script = write_script(tmp_path, "def init(): pass\ndef run(mb): return mb\n")
    with dask.config.set(
        {
            "daskrun.run-max-try": 7,
            "daskrun.mini-batch-size.file": 3,
            "daskrun.append-row-file-name": "scores.txt",
        }
    ):
        cfg = ParallelRunConfig(str(script))
        step = ParallelRunStep(
            "from-config",
            cfg,
            inputs=Dataset.File.from_files(str(script)),
            output=str(tmp_path / "o"),
        )
    assert cfg.run_max_try == 7 and cfg.append_row_file_name == "scores.txt"
    assert step.mini_batch_size == 3
    # an explicit argument wins over dask.config
    with dask.config.set({"daskrun.run-max-try": 7}):
        assert ParallelRunConfig(str(script), run_max_try=2).run_max_try == 2


@pytest.mark.slow
def test_a_hundred_thousand_files(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(100_000):
        (folder / f"{i:06d}").write_bytes(b"")
    run = run_step(
        tmp_path,
        "def init(): pass\ndef run(mb): return mb\n",
        Dataset.File.from_files(str(folder)),
        process_count_per_node=2,
    )
    assert run.status == "Completed", run.error
    assert run.mini_batches_total == 10_000 and run.items_succeeded == 100_000
    with open(run.output_path or "") as f:
        for i, line in enumerate(f):
            assert line == f"{folder}/{i:06d}\n"
    assert i == 99_999


NAME_SCRIPT = """
import os

def init():
    pass

def run(mini_batch):
    if isinstance(mini_batch, list):
        return [os.path.basename(p) for p in mini_batch]
    return [f"row {n}" for n in mini_batch["n"]]
"""


@pytest.mark.parametrize("kind", ["file", "tabular"])
@pytest.mark.parametrize("where", [".", "out"])
def test_own_output_inside_the_input_folder_is_never_read(
    tmp_path: Path, cluster: LocalCluster, kind: str, where: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"in{i}.txt").write_text(f"n\n{i}\n")
    output = str(data / where)
    for attempt in range(2):  # the second run sees the first's output and parts
        ds = (
            Dataset.File.from_files(str(data))
            if kind == "file"
            else Dataset.Tabular.from_delimited_files(str(data))
        )
        run = run_step(
            tmp_path,
            NAME_SCRIPT,
            ds,
            output=output,
            mini_batch_size=1 if kind == "file" else "1KB",
            compute_target=cluster,
        )
        assert run.status == "Completed", run.error
        assert run.items_total == 4, f"run {attempt + 1} read its own output"
        lines = Path(run.output_path or "").read_text().splitlines()
        assert len(lines) == 4


def test_a_failed_csv_mini_batch_counts_its_rows(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [f"{i},word{i}" for i in range(1000)]
    rows[500] = "500,word500,an extra field pandas refuses"
    (data / "t.csv").write_text("n,text\n" + "\n".join(rows) + "\n")
    run = run_step(
        tmp_path,
        NAME_SCRIPT,
        Dataset.Tabular.from_delimited_files(str(data)),
        mini_batch_size="1KB",
        compute_target=cluster,
        error_threshold=-1,
        run_max_try=1,
    )
    assert run.status == "Completed", run.error
    assert run.mini_batches_failed == 1
    # the unreadable range's rows count as failed, not 1
    assert run.items_failed > 50
    assert run.items_succeeded + run.items_failed == 1000
