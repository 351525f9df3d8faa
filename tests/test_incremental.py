"""Incremental steps: only new or changed inputs run, each current input's
rows are in the output once, in input order, as a full recomputation with
pandas gives them; on local files, tables, partitions and Azurite, through
a kill and a resume."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from distributed import LocalCluster

from daskrun import Dataset, ParallelRunConfig, ParallelRunStep, StepRun
from daskrun.engine.output import OutputTarget, Parts
from daskrun.exceptions import ConfigError
from daskrun.registry.records import RunRecord

from .helpers import daskrun, kill_client, poll_for, start_daskrun, write_script

# each file's name and content as one row; the files it ran, in a side log
FILES_SCRIPT = """
import argparse, os, time

def init():
    global LOG, SECONDS
    parser = argparse.ArgumentParser()
    parser.add_argument("--log")
    parser.add_argument("--seconds", type=float, default=0)
    args, _ = parser.parse_known_args()
    LOG, SECONDS = args.log, args.seconds

def run(mini_batch):
    time.sleep(SECONDS * len(mini_batch))
    with open(LOG, "a") as f:
        f.write("".join(os.path.basename(p) + "\\n" for p in mini_batch))
    return [f"{os.path.basename(p)},{open(p).read()}" for p in mini_batch]
"""

# each row with a computed column; the source files it ran, in a side log
TABLE_SCRIPT = """
import argparse

def init():
    global LOG
    parser = argparse.ArgumentParser()
    parser.add_argument("--log")
    LOG = parser.parse_known_args()[0].log

def run(df):
    with open(LOG, "a") as f:
        f.write("".join(f"{s}\\n" for s in sorted(set(df["src"]))))
    return df.assign(double=df["x"] * 2)
"""


def _ran(log: Path) -> list[str]:
    """The inputs the side log says ran, then empties it."""
    if not log.exists():
        return []
    names = log.read_text().split()
    log.write_text("")
    return sorted(names)


def _files_reference(folder: Path) -> pd.DataFrame:
    """Every current file's row, recomputed from scratch."""
    names = sorted(p.name for p in folder.iterdir())
    return pd.DataFrame(
        {"name": names, "value": [(folder / n).read_text() for n in names]}
    )


def _file_rows(path: str) -> pd.DataFrame:
    return pd.read_csv(path, header=None, names=["name", "value"])


def _files_step(
    tmp_path: Path, cluster: Any, size: int, incremental: bool | str = True
) -> ParallelRunStep:
    script = write_script(tmp_path / "code", FILES_SCRIPT)
    cfg = ParallelRunConfig(
        str(script),
        error_threshold=0,
        output_action="append_row",
        mini_batch_size=size,
        compute_target=cluster,
    )
    return ParallelRunStep(
        "incr",
        cfg,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
        arguments=["--log", str(tmp_path / "ran.log")],
        incremental=incremental,
    )


def _counts(run: StepRun) -> dict[str, int]:
    counts = RunRecord.load(run.run_id, Path(run.logs_dir).parents[1]).counts
    result = (Path(run.logs_dir) / "job_result.txt").read_text()
    found = {k: v for k, v in counts.items() if k.startswith("inputs_")}
    for name, n in found.items():
        assert f"{name}: {n}\n" in result
    return found


def _write(folder: Path, names: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in names.items():
        (folder / name).write_text(text)


def test_three_rounds_of_files_match_a_full_recomputation(
    tmp_path: Path, cluster: LocalCluster, runs_dir: Path
) -> None:
    inputs, log = tmp_path / "in", tmp_path / "ran.log"
    _write(inputs, {f"f{i:02d}.txt": f"v{i}" for i in range(0, 20, 2)})

    def step() -> ParallelRunStep:  # inputs listed again each round
        return _files_step(tmp_path, cluster, size=2)

    def round_() -> tuple[StepRun, list[str]]:
        run = step().run()
        assert run.status == "Completed", run.error
        got = _file_rows(run.output_path or "")
        pd.testing.assert_frame_equal(got, _files_reference(inputs))
        return run, _ran(log)

    run, ran = round_()
    assert len(ran) == 10
    assert _counts(run) == {
        "inputs_reused": 0,
        "inputs_new": 10,
        "inputs_changed": 0,
        "inputs_removed": 0,
    }

    # round 1: files added, between earlier mini-batches ([f04, f06] and
    # [f08, f10]) and at the end; a file added inside one runs it again
    _write(inputs, {"f07.txt": "v7", "f30.txt": "v30", "f31.txt": "v31"})
    run, ran = round_()
    assert ran == ["f07.txt", "f30.txt", "f31.txt"]  # only the new ones
    assert _counts(run) == {
        "inputs_reused": 10,
        "inputs_new": 3,
        "inputs_changed": 0,
        "inputs_removed": 0,
    }

    # round 2: a file changed (its size and mtime); its mini-batch runs
    (inputs / "f08.txt").write_text("changed eight")
    run, ran = round_()
    assert "f08.txt" in ran and len(ran) <= 2
    assert _counts(run)["inputs_changed"] == 1

    # round 3: a file removed: its rows are gone, its mini-batch mate runs
    (inputs / "f12.txt").unlink()
    run, ran = round_()
    assert len(ran) <= 1 and "f12.txt" not in ran
    counts = _counts(run)
    assert counts["inputs_removed"] == 1 and counts["inputs_new"] == 0
    assert counts["inputs_reused"] == 13 - 1 - len(ran)

    # nothing changed: nothing runs, the output is the same
    run, ran = round_()
    assert ran == [] and _counts(run)["inputs_reused"] == 13 - 1
    # one kept run beside the output, named by the pointer
    kept = json.loads((tmp_path / "out/.daskrun/increment.json").read_text())
    assert kept["run_id"] == run.run_id
    assert sorted(p.name for p in (tmp_path / "out/.daskrun").iterdir()) == sorted(
        [run.run_id, "increment.json"]
    )


def _tables(folder: Path, files: dict[str, range], fmt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        frame = pd.DataFrame({"src": name, "x": list(rows)})
        path = folder / f"{name}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)


def _tables_reference(folder: Path, fmt: str) -> pd.DataFrame:
    read: Callable[[Path], pd.DataFrame] = (
        pd.read_csv if fmt == "csv" else pd.read_parquet  # type: ignore[assignment]
    )
    frames = [read(p) for p in sorted(folder.glob(f"*.{fmt}"))]
    whole = pd.concat(frames, ignore_index=True)
    return whole.assign(double=whole["x"] * 2)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_tables_three_rounds(
    tmp_path: Path, cluster: LocalCluster, runs_dir: Path, fmt: str
) -> None:
    inputs, log = tmp_path / "t", tmp_path / "ran.log"
    _tables(inputs, {f"t{i}": range(i * 100, i * 100 + 50) for i in range(4)}, fmt)
    script = write_script(tmp_path / "code", TABLE_SCRIPT)
    cfg = ParallelRunConfig(
        str(script),
        error_threshold=0,
        output_action="append_row",
        output_format="csv",
        mini_batch_size="1KB",  # a CSV file is several mini-batches
        compute_target=cluster,
    )
    factory = (
        Dataset.Tabular.from_delimited_files
        if fmt == "csv"
        else Dataset.Tabular.from_parquet_files
    )

    # a new step each round: a script run again lists its inputs again
    def step() -> ParallelRunStep:
        return ParallelRunStep(
            "incr-tables",
            cfg,
            inputs=[factory(str(inputs / f"*.{fmt}"))],
            output=str(tmp_path / "out"),
            arguments=["--log", str(log)],
            incremental=True,
        )

    def round_() -> tuple[StepRun, list[str]]:
        run = step().run()
        assert run.status == "Completed", run.error
        got = pd.read_csv(run.output_path or "")
        pd.testing.assert_frame_equal(got, _tables_reference(inputs, fmt))
        return run, sorted(set(_ran(log)))

    assert round_()[1] == ["t0", "t1", "t2", "t3"]
    _tables(inputs, {"t15": range(7), "t9": range(9)}, fmt)  # added
    run, ran = round_()
    assert ran == ["t15", "t9"]
    assert _counts(run)["inputs_reused"] == 4
    _tables(inputs, {"t2": range(5000, 5070)}, fmt)  # changed
    run, ran = round_()
    assert ran == ["t2"]
    assert _counts(run)["inputs_changed"] == 1
    (inputs / f"t1.{fmt}").unlink()  # removed
    run, ran = round_()
    assert ran == []
    assert _counts(run) == {
        "inputs_reused": 5,
        "inputs_new": 0,
        "inputs_changed": 0,
        "inputs_removed": 1,
    }


def test_a_new_partition_is_new_work(
    tmp_path: Path, cluster: LocalCluster, runs_dir: Path
) -> None:
    inputs, log = tmp_path / "in", tmp_path / "ran.log"
    for user in ("ann", "bob"):
        _write(inputs / user, {f"{user}{i}.txt": f"{user}-{i}" for i in range(3)})
    script = write_script(tmp_path / "code", FILES_SCRIPT)
    cfg = ParallelRunConfig(
        str(script),
        error_threshold=0,
        output_action="append_row",
        partition_keys=["user"],
        compute_target=cluster,
    )

    # a new step each round: a script run again lists its inputs again
    def step() -> ParallelRunStep:
        return ParallelRunStep(
            "incr-parts",
            cfg,
            inputs=[
                Dataset.File.from_files(str(inputs), partition_format="/{user}/{n}.txt")
            ],
            output=str(tmp_path / "out"),
            arguments=["--log", str(log)],
            incremental=True,
        )

    def reference() -> list[str]:
        return [
            f"{p.name},{p.read_text()}"
            for user in sorted(inputs.iterdir())
            for p in sorted(user.iterdir())
        ]

    run = step().run()
    assert run.status == "Completed", run.error
    assert len(_ran(log)) == 6
    _write(inputs / "ann2", {"x.txt": "new"})  # a new partition, between two
    run = step().run()
    assert run.status == "Completed", run.error
    assert Path(run.output_path or "").read_text().splitlines() == reference()
    assert _ran(log) == ["x.txt"]
    assert _counts(run)["inputs_new"] == 1


def test_a_pipeline_step_is_incremental_too(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    from daskrun import Experiment, Pipeline, Workspace

    ws = Workspace.create(tmp_path / "ws")
    inputs, log = tmp_path / "in", tmp_path / "ran.log"
    _write(inputs, {f"f{i}.txt": f"v{i}" for i in range(4)})

    def submit() -> StepRun:
        # a new pipeline each day, as a scheduled script builds it
        step = _files_step(tmp_path, cluster, size=2)
        pipeline_run = Experiment(ws, "daily").submit(Pipeline(ws, steps=[step]))
        assert pipeline_run.wait_for_completion() == "Completed"
        run: StepRun = pipeline_run.find_step_run("incr")[0]
        got = _file_rows(run.output_path or "")
        pd.testing.assert_frame_equal(got, _files_reference(inputs))
        return run

    submit()
    assert len(_ran(log)) == 4
    _write(inputs, {"f9.txt": "v9"})
    run = submit()
    assert _ran(log) == ["f9.txt"]
    counts = RunRecord.load(run.run_id, ws.runs_dir).counts
    assert counts["inputs_reused"] == 4 and counts["inputs_new"] == 1


def test_a_changed_script_runs_everything_and_says_so(
    tmp_path: Path, runs_dir: Path
) -> None:
    _write(tmp_path / "in", {f"f{i}.txt": f"v{i}" for i in range(6)})
    write_script(tmp_path / "code", FILES_SCRIPT)
    args = [
        "run",
        "code/score.py",
        "--input",
        "in",
        "--output",
        "out",
        "--mini-batch-size",
        "2",
        "--processes",
        "1",
        "--incremental",
        "--",
        "--log",
        str(tmp_path / "ran.log"),
    ]
    first = daskrun(*args, cwd=tmp_path, runs=runs_dir)
    assert first.returncode == 0, first.stderr
    assert len(_ran(tmp_path / "ran.log")) == 6

    write_script(tmp_path / "code", FILES_SCRIPT + "\n# edited\n")
    second = daskrun(*args, cwd=tmp_path, runs=runs_dir)
    assert second.returncode == 0, second.stderr
    assert len(_ran(tmp_path / "ran.log")) == 6  # everything again
    said = [line for line in second.stderr.splitlines() if "incremental" in line]
    assert len(said) == 1 and "entry script" in said[0], second.stderr

    # compared on inputs alone, an edit keeps every row
    write_script(tmp_path / "code", FILES_SCRIPT + "\n# edited again\n")
    args[args.index("--incremental")] = "--incremental=inputs"
    third = daskrun(*args, cwd=tmp_path, runs=runs_dir)
    assert third.returncode == 0, third.stderr
    assert _ran(tmp_path / "ran.log") == []
    assert "6 inputs reused" in third.stderr
    assert (tmp_path / "out/parallel_run_step.txt").read_text().splitlines() == [
        f"f{i}.txt,v{i}" for i in range(6)
    ]


def test_bad_incremental_values_are_refused_in_one_line(tmp_path: Path) -> None:
    _write(tmp_path / "in", {"a.txt": "a"})
    with pytest.raises(ConfigError, match=r"incremental='yes' is not a choice"):
        _files_step(tmp_path, None, 2, incremental="yes")
    script = write_script(tmp_path / "code", FILES_SCRIPT)
    cfg = ParallelRunConfig(str(script), output_action="summary_only")
    step = ParallelRunStep(
        "incr-none",
        cfg,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        incremental=True,
    )
    with pytest.raises(ConfigError, match="output_action='append_row'"):
        step.run()


def _written(out: Path, run_id: str) -> set[int]:
    return Parts(OutputTarget(str(out), "unused", run_id)).whole


@pytest.mark.slow
def test_killed_mid_increment_then_resumed(tmp_path: Path, runs_dir: Path) -> None:
    inputs, out, log = tmp_path / "in", tmp_path / "out", tmp_path / "ran.log"
    _write(inputs, {f"a{i:03d}.txt": f"v{i}" for i in range(30)})
    write_script(tmp_path / "code", FILES_SCRIPT)
    args = [
        "run",
        "code/score.py",
        "--input",
        "in",
        "--output",
        "out",
        "--mini-batch-size",
        "1",
        "--processes",
        "2",
        "--incremental",
        "--",
        "--log",
        str(log),
        "--seconds",
        "0.3",
    ]
    first = daskrun(*args, cwd=tmp_path, runs=runs_dir)
    assert first.returncode == 0, first.stderr
    published = (out / "parallel_run_step.txt").read_bytes()
    kept_run = json.loads((out / ".daskrun/increment.json").read_text())["run_id"]
    _ran(log)

    _write(inputs, {f"b{i:03d}.txt": f"w{i}" for i in range(30)})  # 30 new
    (inputs / "a003.txt").write_text("changed")
    proc = start_daskrun(*args, cwd=tmp_path, runs=runs_dir)

    def new_run() -> str | None:
        found = [p.name for p in (out / ".daskrun").iterdir() if p.is_dir()]
        return next((r for r in found if r != kept_run), None)

    # 29 kept rows are copied first; then some of the 31 to run are written
    poll_for(
        lambda: (r := new_run()) is not None and len(_written(out, r)) >= 29 + 5,
        timeout=120,
        what="new mini-batches written",
        running=proc,
    )
    kill_client(proc)
    run_id = new_run()
    assert run_id is not None and len(_written(out, run_id)) < 60
    # the earlier output is as it was, and still kept
    assert (out / "parallel_run_step.txt").read_bytes() == published
    assert json.loads((out / ".daskrun/increment.json").read_text()) == {
        "run_id": kept_run
    }

    resumed = daskrun("resume", run_id, cwd=tmp_path, runs=runs_dir)
    assert resumed.returncode == 0, resumed.stderr
    ran = _ran(log)
    assert not any(name.startswith("a") and name != "a003.txt" for name in ran)
    got = _file_rows(str(out / "parallel_run_step.txt"))
    pd.testing.assert_frame_equal(got, _files_reference(inputs))  # each row once
    record = RunRecord.load(run_id)
    assert record.counts["inputs_reused"] == 29
    assert record.counts["inputs_new"] == 30
    assert record.counts["inputs_changed"] == 1
    assert not (out / ".daskrun" / kept_run).exists()


@pytest.mark.slow
def test_three_rounds_on_azurite(
    tmp_path: Path, cluster: LocalCluster, azurite: str, runs_dir: Path
) -> None:
    from adlfs import AzureBlobFileSystem

    fs = AzureBlobFileSystem(connection_string=azurite)
    name = f"c{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    options = {"connection_string": azurite}
    log = tmp_path / "ran.log"
    files = {f"f{i:02d}.txt": f"v{i}" for i in range(0, 12, 2)}
    for n, text in files.items():
        fs.pipe_file(f"{name}/in/{n}", text.encode())
    script = write_script(tmp_path / "code", FILES_SCRIPT)
    cfg = ParallelRunConfig(
        str(script),
        error_threshold=0,
        output_action="append_row",
        mini_batch_size=2,
        compute_target=cluster,
    )

    # a new step each round: a script run again lists its inputs again
    def step() -> ParallelRunStep:
        return ParallelRunStep(
            "incr-blob",
            cfg,
            inputs=[
                Dataset.File.from_files(f"abfs://{name}/in", storage_options=options)
            ],
            output=f"abfs://{name}/out",
            output_storage_options=options,
            arguments=["--log", str(log)],
            incremental=True,
        )

    def round_() -> tuple[StepRun, list[str]]:
        run = step().run()
        assert run.status == "Completed", run.error
        text = fs.cat_file(f"{name}/out/parallel_run_step.txt").decode()
        got = [line.split(",", 1) for line in text.splitlines()]
        expected = pd.DataFrame(sorted(files.items()), columns=["name", "value"])
        pd.testing.assert_frame_equal(
            pd.DataFrame(got, columns=["name", "value"]), expected
        )
        return run, _ran(log)

    assert len(round_()[1]) == 6
    files.update({"f07.txt": "v7", "f20.txt": "v20"})  # added
    for n in ("f07.txt", "f20.txt"):
        fs.pipe_file(f"{name}/in/{n}", files[n].encode())
    run, ran = round_()
    assert ran == ["f07.txt", "f20.txt"]
    assert _counts(run)["inputs_reused"] == 6
    time.sleep(1)  # a new ETag and last-modified time
    files["f04.txt"] = "changed"
    fs.pipe_file(f"{name}/in/f04.txt", b"changed")
    run, ran = round_()
    assert "f04.txt" in ran and len(ran) <= 2
    assert _counts(run)["inputs_changed"] == 1
    del files["f10.txt"]
    fs.rm(f"{name}/in/f10.txt")
    run, ran = round_()
    assert len(ran) <= 1 and _counts(run)["inputs_removed"] == 1
    # the output folder holds the file and one kept run
    kept = json.loads(fs.cat_file(f"{name}/out/.daskrun/increment.json"))
    assert kept["run_id"] == run.run_id
    assert not [p for p in fs.find(f"{name}/out") if "/.daskrun/" not in p][1:]


@pytest.mark.slow
def test_killed_mid_increment_on_azurite_then_resumed(
    tmp_path: Path, azurite: str, runs_dir: Path
) -> None:
    from adlfs import AzureBlobFileSystem

    fs = AzureBlobFileSystem(connection_string=azurite)
    name = f"c{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    out, options = f"abfs://{name}/out", {"connection_string": azurite}
    inputs, log = tmp_path / "in", tmp_path / "ran.log"
    _write(inputs, {f"a{i:03d}.txt": f"v{i}" for i in range(20)})
    write_script(tmp_path / "code", FILES_SCRIPT)
    args = [
        "run", "code/score.py", "--input", "in", "--output", out,
        "--mini-batch-size", "1", "--processes", "2", "--incremental",
        "--", "--log", str(log), "--seconds", "0.3",
    ]  # fmt: skip
    env = {"AZURE_STORAGE_CONNECTION_STRING": azurite}
    first = daskrun(*args, cwd=tmp_path, runs=runs_dir, **env)
    assert first.returncode == 0, first.stderr
    final = f"{name}/out/parallel_run_step.txt"
    published = fs.cat_file(final)
    kept_run = json.loads(fs.cat_file(f"{name}/out/.daskrun/increment.json"))["run_id"]
    _ran(log)

    _write(inputs, {f"b{i:03d}.txt": f"w{i}" for i in range(20)})  # 20 new
    proc = start_daskrun(*args, cwd=tmp_path, runs=runs_dir, **env)

    def written(run_id: str) -> set[int]:
        return Parts(OutputTarget(out, "unused", run_id, options)).whole

    def new_run() -> str | None:
        fs.invalidate_cache()
        found = [
            p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{name}/out/.daskrun")
        ]
        return next((r for r in found if r not in (kept_run, "increment.json")), None)

    poll_for(
        lambda: (r := new_run()) is not None and len(written(r)) >= 20 + 4,
        timeout=120,
        what="new mini-batches written on Azurite",
        running=proc,
    )
    kill_client(proc)
    run_id = new_run()
    assert run_id is not None and len(written(run_id)) < 40
    fs.invalidate_cache()
    assert fs.cat_file(final) == published  # the earlier output, as it was

    resumed = daskrun("resume", run_id, cwd=tmp_path, runs=runs_dir, **env)
    assert resumed.returncode == 0, resumed.stderr
    assert not [n for n in _ran(log) if n.startswith("a")]
    fs.invalidate_cache()
    got = pd.DataFrame(
        [line.split(",", 1) for line in fs.cat_file(final).decode().splitlines()],
        columns=["name", "value"],
    )
    pd.testing.assert_frame_equal(got, _files_reference(inputs))  # each row once
    kept = json.loads(fs.cat_file(f"{name}/out/.daskrun/increment.json"))
    assert kept["run_id"] == run_id and not fs.exists(f"{name}/out/.daskrun/{kept_run}")
