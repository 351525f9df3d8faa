"""Named outputs: ``ParallelRunStep(outputs={...})`` writes each output
exactly once, in input order, in its own format and folder; a pipeline's
next step reads one of them; a kill and a resume leave both exact."""

from __future__ import annotations

import io
from pathlib import Path

import dask
import pandas as pd
import pytest
from distributed import LocalCluster

import daskrun
from daskrun import (
    ConfigError,
    Dataset,
    Experiment,
    OutputSpec,
    ParallelRunConfig,
    ParallelRunStep,
    Pipeline,
    PipelineData,
    Workspace,
)
from daskrun.engine.output import lock_output, prepare_parts, write_part
from daskrun.engine.outputs import NamedOutput, OutputSet, ViaClientSet, section
from daskrun.engine.viaclient import ViaClientTarget
from daskrun.exceptions import OutputError
from daskrun.registry.records import RunRecord

from .helpers import (
    committed,
    kill_client,
    make_files,
    poison_rows,
    start_daskrun,
    wait_for_parts,
    write_script,
)
from .helpers import daskrun as daskrun_cli

# scores: one row per file (CSV); labels: one line per file (text);
# embeddings: two rows per file (Parquet), whatever the item count says
SCORING = """
import os
import pandas as pd

def init():
    pass

def run(mini_batch):
    names = [os.path.basename(p) for p in mini_batch]
    values = [int(open(p).read()) for p in mini_batch]
    return {
        "scores": pd.DataFrame({"file": names, "score": [v / 4 for v in values]}),
        "labels": [f"{n} {'even' if v % 2 == 0 else 'odd'}" for n, v in
                   zip(names, values)],
        "embeddings": pd.DataFrame(
            {"file": [n for n in names for _ in (0, 1)],
             "dim": [d for _ in names for d in (0, 1)],
             "value": [v * 10 + d for v in values for d in (0, 1)]}
        ),
    }
"""


def _reference(n: int) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    names = [f"f{i:05d}.txt" for i in range(n)]
    scores = pd.DataFrame({"file": names, "score": [i / 4 for i in range(n)]})
    labels = [
        f"{name} {'even' if i % 2 == 0 else 'odd'}" for i, name in enumerate(names)
    ]
    embeddings = pd.DataFrame(
        {
            "file": [name for name in names for _ in (0, 1)],
            "dim": [d for _ in names for d in (0, 1)],
            "value": [i * 10 + d for i in range(n) for d in (0, 1)],
        }
    )
    return scores, labels, embeddings


def _outputs(tmp_path: Path) -> dict[str, object]:
    return {
        "scores": OutputSpec(str(tmp_path / "scores"), format="csv"),
        "labels": str(tmp_path / "labels"),  # the step's format: text
        "embeddings": OutputSpec(str(tmp_path / "emb"), format="parquet"),
    }


def _step(
    tmp_path: Path, cluster: LocalCluster, name: str, mini_batch_size: int
) -> ParallelRunStep:
    """The scoring step over ``tmp_path/in`` with :func:`_outputs`."""
    config = ParallelRunConfig(
        entry_script=str(tmp_path / "score.py"),
        output_action="append_row",
        mini_batch_size=mini_batch_size,
        compute_target=cluster,
    )
    return ParallelRunStep(
        name,
        config,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        outputs=_outputs(tmp_path),
    )


def _check_exact(tmp_path: Path, n: int) -> None:
    scores, labels, embeddings = _reference(n)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "scores" / "scores.csv"), scores
    )
    assert (tmp_path / "labels" / "labels.txt").read_text().splitlines() == labels
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "emb" / "embeddings.parquet"), embeddings
    )


def test_parts_hold_every_output_in_one_file() -> None:
    """One part per mini-batch, one section per output, one item count."""
    outputs = (
        NamedOutput("a", "/x/a", "a.csv", "csv"),
        NamedOutput("b", "/x/b", "b.txt", "text"),
    )
    target = OutputSet.of_named(outputs, "run_1", None)
    part, items = target.encode({"a": pd.DataFrame({"v": [1, 2, 3]}), "b": ["z"]}, 3)
    assert items == 3
    assert section(part, "a") == b"v\n1\n2\n3\n"
    assert section(part, "b") == b"z\n"
    assert target.format.count(io.BytesIO(part)) == 3
    with pytest.raises(ValueError, match="run\\(\\) returned no output 'b'"):
        target.encode({"a": [1]}, 1)
    with pytest.raises(ValueError, match="output 'c' that the step does not have"):
        target.encode({"a": [1], "b": [2], "c": [3]}, 1)
    with pytest.raises(TypeError, match="returns a dict of output name to rows"):
        target.encode([1], 1)
    with pytest.raises(TypeError, match="for output 'b' str"):
        target.encode({"a": [1], "b": "oops"}, 1)


def test_the_client_writes_a_set_of_outputs_as_one() -> None:
    outputs = (NamedOutput("a", "/x/a", "a.csv", "csv"),)
    target = ViaClientTarget.of(OutputSet.of_named(outputs, "run_1", None))
    assert isinstance(target, ViaClientSet)
    assert target.outputs == outputs and not target.grouped
    assert target.keep(0, b"rows") == b"rows"  # back to the client, unwritten


def test_no_output_is_published_unless_all_are(tmp_path: Path) -> None:
    """The second output's parts disagree on their columns: its assembly
    fails, and the first output, assembled already, is not published."""
    outputs = (
        NamedOutput("a", str(tmp_path / "a"), "a.txt", "text"),
        NamedOutput("b", str(tmp_path / "b"), "b.parquet", "parquet"),
    )
    target = OutputSet.of_named(outputs, "run_1", None)
    prepare_parts(target)
    for index, column in enumerate(["x", "y"]):
        rows = {"a": [f"line {index}"], "b": pd.DataFrame({column: [index]})}
        write_part(target, index, target.encode(rows, 1)[0])
    with pytest.raises(OutputError, match="mini-batch 1 \\(output 'b'\\) returned"):
        target.publish([1, 1])
    assert not (tmp_path / "a" / "a.txt").exists()
    assert not (tmp_path / "b" / "b.parquet").exists()
    assert not list(tmp_path.glob("*/.daskrun/run_1/*.partial"))
    # the parts are kept: fixed, the same parts publish both
    fixed = {"a": ["line 1"], "b": pd.DataFrame({"x": [1]})}
    write_part(target, 1, target.encode(fixed, 1)[0])
    assert target.publish([1, 1]) == str(tmp_path / "a" / "a.txt")
    assert (tmp_path / "a" / "a.txt").read_text() == "line 0\nline 1\n"
    assert pd.read_parquet(tmp_path / "b" / "b.parquet")["x"].tolist() == [0, 1]


def test_three_outputs_exact_and_in_order(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    make_files(tmp_path / "in", 41)
    write_script(tmp_path, SCORING)
    step = _step(tmp_path, cluster, "named", 4)
    run = step.run()
    assert run.status == "Completed", run.error
    _check_exact(tmp_path, 41)
    # one item per input, whatever the outputs hold (embeddings: two rows)
    assert (run.items_total, run.items_succeeded, run.items_extra) == (41, 41, 0)
    assert run.output_path == str(tmp_path / "scores" / "scores.csv")
    frame = run.to_dask_dataframe("embeddings").compute()
    assert frame["value"].tolist() == _reference(41)[2]["value"].tolist()
    assert run.to_bag("labels").take(2) == ("f00000.txt even", "f00001.txt odd")
    with pytest.raises(ConfigError, match="has no output 'nope'; its outputs"):
        run.to_dask_dataframe("nope")
    with pytest.raises(ConfigError, match="name the one to read"):
        run.to_dask_dataframe()
    # nothing of daskrun's own is left in the outputs' folders
    for folder in ("scores", "labels", "emb"):
        assert [p.name for p in (tmp_path / folder).iterdir()] != []
        assert not (tmp_path / folder / ".daskrun").exists()


def test_via_client_writes_named_outputs(tmp_path: Path, cluster: LocalCluster) -> None:
    make_files(tmp_path / "in", 17)
    write_script(tmp_path, SCORING)
    step = _step(tmp_path, cluster, "named-via-client", 3)
    with dask.config.set({"daskrun.output.via-client": True}):
        run = step.run()
    assert run.status == "Completed", run.error
    _check_exact(tmp_path, 17)


def test_a_missing_output_fails_its_mini_batch_naming_it(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    make_files(tmp_path / "in", 6)
    write_script(
        tmp_path,
        """
        def init():
            pass

        def run(mini_batch):
            return {"scores": [1] * len(mini_batch)}
        """,
    )
    config = ParallelRunConfig(
        entry_script=str(tmp_path / "score.py"),
        output_action="append_row",
        mini_batch_size=3,
        error_threshold=-1,
        run_max_try=1,
        compute_target=cluster,
    )
    step = ParallelRunStep(
        "named-missing",
        config,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        outputs={"scores": str(tmp_path / "s"), "labels": str(tmp_path / "l")},
    )
    with dask.config.set({"daskrun.isolate-failures": False}):
        run = step.run()
    assert run.items_failed == 6
    report = (Path(run.logs_dir) / "job_error.txt").read_text()
    assert "run() returned no output 'labels'" in report
    assert "return a dict with every output of the step: 'scores', 'labels'" in report
    # a failed item is in neither output
    assert (tmp_path / "s" / "scores.txt").read_text() == ""
    assert (tmp_path / "l" / "labels.txt").read_text() == ""


def test_isolated_rows_leave_every_output_exact(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    """Tabular rows in, a mini-batch with a bad row split down to it: both
    outputs hold every other row once, in order."""
    poison = {7, 30, 31}
    frame = poison_rows(tmp_path / "in" / "rows.csv", 60, poison)
    write_script(
        tmp_path,
        """
        def init():
            pass

        def run(df):
            if (df["v"] < 0).any():
                raise ValueError("a negative value")
            return {"ids": df[["id"]], "doubled": (df["v"] * 2).tolist()}
        """,
    )
    config = ParallelRunConfig(
        entry_script=str(tmp_path / "score.py"),
        output_action="append_row",
        mini_batch_size="100",  # bytes: a few rows a mini-batch
        error_threshold=-1,
        run_max_try=1,
        compute_target=cluster,
    )
    step = ParallelRunStep(
        "named-isolated",
        config,
        inputs=[Dataset.Tabular.from_delimited_files(str(tmp_path / "in"))],
        outputs={
            "ids": OutputSpec(str(tmp_path / "ids"), format="parquet"),
            "doubled": OutputSpec(str(tmp_path / "doubled"), format="csv"),
        },
    )
    run = step.run()
    assert run.status == "Completed", run.error
    assert (run.items_succeeded, run.items_failed) == (57, 3)
    good = frame[~frame["id"].isin(poison)]
    ids = pd.read_parquet(tmp_path / "ids" / "ids.parquet")
    assert ids["id"].tolist() == good["id"].tolist()
    doubled = pd.read_csv(tmp_path / "doubled" / "doubled.csv")
    assert doubled["result"].tolist() == (good["v"] * 2).tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outputs": {}}, r"outputs=\{\} names no output; pass e\.g\. outputs="),
        ({"outputs": {1: "a"}}, "outputs has a name 1 that is not a str"),
        ({"outputs": {"a b": "a"}}, "output name 'a b' is not a name"),
        ({"outputs": ["a"]}, r"outputs=\['a'\] is not a dict"),
        (
            {"outputs": {"a": "x"}, "output": "y"},
            "pass output= or outputs=, not both",
        ),
        ({"outputs": {"a": 3}}, "output 'a' goes to 3, which is not a folder"),
        (
            {"outputs": {"a": OutputSpec("x", format="xml")}},
            "output 'a': output_format='xml' is not one of",
        ),
        (
            {"outputs": {"a": "x", "b": OutputSpec("x", file_name="a.txt")}},
            "outputs 'a' and 'b' both write",
        ),
    ],
)
def test_bad_outputs_are_one_line(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    write_script(tmp_path, SCORING)
    config = ParallelRunConfig(
        entry_script=str(tmp_path / "score.py"), output_action="append_row"
    )
    make_files(tmp_path / "in", 1)
    with pytest.raises(ConfigError, match=message) as caught:
        ParallelRunStep(
            "bad",
            config,
            inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
            **kwargs,  # type: ignore[arg-type]
        )
    assert "\n" not in str(caught.value)


def test_bad_outputs_on_the_cli_exit_2(tmp_path: Path, runs_dir: Path) -> None:
    make_files(tmp_path / "in", 2)
    write_script(tmp_path, SCORING)
    for args, message in [
        (["--outputs", "scores"], "--outputs 'scores' is not NAME[:FORMAT]=DIR"),
        (
            ["--outputs", "a=x", "--output", "y"],
            "pass output= or outputs=, not both",
        ),
    ]:
        result = daskrun_cli(
            "run", "score.py", "--input", "in", *args, cwd=tmp_path, runs=runs_dir
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


SLOW_SCORING = SCORING.replace(
    "def run(mini_batch):", "import time\n\ndef run(mini_batch):\n    time.sleep(0.1)"
)


def test_kill_and_resume_leave_every_output_exact(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "in", 120)
    write_script(tmp_path, SLOW_SCORING)
    args = [
        "run",
        "score.py",
        "--input",
        "in",
        "--mini-batch-size",
        "2",
        "--processes",
        "2",
        "--outputs",
        "scores:csv=scores",
        "labels=labels",
        "embeddings:parquet=emb",
    ]
    proc = start_daskrun(*args, cwd=tmp_path, runs=runs_dir)
    wait_for_parts(tmp_path / "scores", 10, proc)
    kill_client(proc)
    written = committed(tmp_path / "scores")
    assert 10 <= len(written) < 60
    # killed: no output looks complete
    assert not (tmp_path / "scores" / "scores.csv").exists()
    assert not (tmp_path / "labels" / "labels.txt").exists()
    assert not (tmp_path / "emb" / "embeddings.parquet").exists()

    (record,) = RunRecord.find(runs_dir)
    result = daskrun_cli("resume", record.run_id, cwd=tmp_path, runs=runs_dir)
    assert result.returncode == 0, result.stderr
    _check_exact(tmp_path, 120)
    resumed = RunRecord.load(record.run_id, runs_dir)
    assert resumed.counts["items_succeeded"] == 120
    assert set(resumed.named_outputs) == {"scores", "labels", "embeddings"}


def test_a_pipeline_step_reads_one_named_output(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    ws = Workspace.create(tmp_path / "ws")
    make_files(tmp_path / "in", 9)
    write_script(tmp_path / "src", SCORING)
    write_script(
        tmp_path / "src2",
        """
        import pandas as pd

        def init():
            pass

        def run(mini_batch):
            # each input is the first step's scores file
            return [f"{len(pd.read_csv(p))} scores" for p in mini_batch]
        """,
        "count.py",
    )
    scores = PipelineData("scores")
    first = ParallelRunStep(
        "score",
        ParallelRunConfig(
            entry_script="score.py",
            source_directory=str(tmp_path / "src"),
            output_action="append_row",
            mini_batch_size=2,
            compute_target=cluster,
        ),
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        outputs={
            "scores": OutputSpec(scores, format="csv"),
            "labels": PipelineData("labels"),
            "embeddings": OutputSpec(str(tmp_path / "emb"), format="parquet"),
        },
    )
    second = ParallelRunStep(
        "count",
        ParallelRunConfig(
            entry_script="count.py",
            source_directory=str(tmp_path / "src2"),
            output_action="append_row",
            compute_target=cluster,
        ),
        inputs=[scores],
        output=PipelineData("counts"),
    )
    # listed out of order: the pipeline runs the writer of "scores" first
    run = Experiment(ws, "named").submit(Pipeline(ws, [second, first]))
    assert run.wait_for_completion() == "Completed"
    steps = run.get_steps()
    assert [s.name for s in steps] == ["score", "count"]
    counted = steps[1].get_output_data("counts").download(tmp_path / "dl")
    assert (Path(counted) / "parallel_run_step.txt").read_text() == "9 scores\n"
    # each named output reads as its own data set
    frame = steps[0].to_dask_dataframe("scores").compute()
    assert frame.to_dict("list") == _reference(9)[0].to_dict("list")
    labels = steps[0].get_output_data("labels").download(tmp_path / "labels")
    assert (Path(labels) / "labels.txt").read_text().splitlines() == _reference(9)[1]
    assert daskrun.StepRun is type(steps[0])


def test_an_output_folder_in_use_by_another_run_is_refused(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    # another run holds the lock of the step's second output's folder (a
    # real lock file, as a running job takes it): the step is refused in one
    # line before anything runs, and the first output's lock is let go
    make_files(tmp_path / "in", 3)
    write_script(tmp_path, SCORING)
    held = NamedOutput("labels", str(tmp_path / "labels"), "labels.txt", "text")
    lock = lock_output(held.target("other-run_1", None))
    try:
        step = _step(tmp_path, cluster, "named", 4)
        with pytest.raises(ConfigError, match="is in use by run 'other-run_1'"):
            step.run()
    finally:
        lock.release()
    assert not (tmp_path / "scores" / ".daskrun" / "lock").exists()
    assert not (tmp_path / "scores" / "scores.csv").exists()


def test_a_changed_output_format_is_not_reused(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    # allow_reuse: the same step again reuses its run; the same step whose
    # named output is written in another format runs (other files)
    ws = Workspace.create(tmp_path / "ws")
    make_files(tmp_path / "in", 4)
    write_script(tmp_path / "src", SCORING)

    def submit(scores_format: str) -> str:
        step = ParallelRunStep(
            "score",
            ParallelRunConfig(
                entry_script="score.py",
                source_directory=str(tmp_path / "src"),
                output_action="append_row",
                mini_batch_size=2,
                compute_target=cluster,
            ),
            inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
            outputs={
                "scores": OutputSpec(PipelineData("scores"), format=scores_format),
                "labels": PipelineData("labels"),
                "embeddings": PipelineData("embeddings"),
            },
        )
        run = Experiment(ws, "reuse").submit(Pipeline(ws, [step]))
        assert run.wait_for_completion() == "Completed"
        (step_run,) = run.get_steps()
        return step_run.reused_from or ""

    first = submit("csv")
    assert first == ""
    assert submit("csv") != ""  # nothing changed: reused
    assert submit("parquet") == ""  # another format: run again
