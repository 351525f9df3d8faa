"""Planning and validation are pure: no cluster needed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daskrun import ConfigError, Dataset, InputError, ParallelRunConfig
from daskrun.backends.inputs.datasets import CsvBatch, ParquetBatch, plan_row_groups
from daskrun.engine.config import ResolvedConfig, parse_byte_size, parse_file_count
from daskrun.engine.ledger import PlanLedger, read_listing
from daskrun.engine.naming import check_arguments, check_step_name
from daskrun.engine.runner import Tally, check_thresholds

from .helpers import make_files, write_script


@pytest.mark.parametrize(
    "value, expected",
    [
        (1, 1),
        ("1", 1),
        ("1KB", 1024),
        ("1kb", 1024),
        ("10MB", 10 * 2**20),
        ("1GB", 2**30),
        ("1mB", 2**20),
        (4096, 4096),
    ],
)
def test_byte_sizes(value: object, expected: int) -> None:
    assert parse_byte_size(value) == expected


@pytest.mark.parametrize(
    "value", ["1 MB", "1M", "MB", "1.5MB", "-1", 0, 1.5, None, True, "1TB"]
)
def test_bad_byte_sizes_name_the_value_and_the_fix(value: object) -> None:
    with pytest.raises(ConfigError, match=r"mini_batch_size=.*(1MB|1 byte)"):
        parse_byte_size(value)


def test_file_counts() -> None:
    assert parse_file_count("7") == 7
    for bad in ("10 files", 0, -3, "1MB", 2.0, True):
        with pytest.raises(ConfigError, match="mini_batch_size="):
            parse_file_count(bad)


@pytest.mark.parametrize("name", ["abc", "batch-scoring", "a1-b2", "x" * 32])
def test_good_step_names(name: str) -> None:
    assert check_step_name(name) == name


@pytest.mark.parametrize(
    "name", ["ab", "x" * 33, "Batch", "1abc", "abc-", "a_bc", "", None]
)
def test_bad_step_names(name: object) -> None:
    with pytest.raises(ConfigError, match="not a valid step name"):
        check_step_name(name)


def test_arguments_must_start_with_an_option_and_avoid_reserved_names() -> None:
    assert check_arguments(["--model", "m"]) == ["--model", "m"]
    with pytest.raises(ConfigError, match="must start with an option"):
        check_arguments(["model", "--x"])
    for reserved in (
        "--mini_batch_size",
        "--mini-batch-size=3",
        "--error_threshold",
        "--run-max-try",
    ):
        with pytest.raises(ConfigError, match="reserved"):
            check_arguments(["--x", "1", reserved, "2"])


def test_row_groups_are_grouped_up_to_the_size() -> None:
    assert plan_row_groups([10] * 10, 35) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert plan_row_groups([100, 1], 10) == [[0], [1]]


def test_files_are_sorted_and_globbed(tmp_path: Path) -> None:
    make_files(tmp_path / "a", 3)
    make_files(tmp_path / "b", 2, prefix="g")
    (tmp_path / "b" / "skip.csv").write_text("x")
    ds = Dataset.File.from_files([str(tmp_path / "b" / "*.txt"), str(tmp_path / "a")])
    names = [Path(p).name for p in ds.files()]
    assert names == [
        "f00000.txt",
        "f00001.txt",
        "f00002.txt",
        "g00000.txt",
        "g00001.txt",
    ]
    batches = list(ds.plan(2))
    assert [b.index for b in batches] == [0, 1, 2]
    assert [len(b.paths) for b in batches] == [2, 2, 1]


def test_missing_and_empty_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"'.*nope' matches no files"):
        Dataset.File.from_files(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="matches no files.*empty folder"):
        Dataset.File.from_files(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="matches no files"):
        Dataset.Tabular.from_delimited_files(str(tmp_path / "*.csv"))


def test_csv_plan_never_crosses_files(tmp_path: Path) -> None:
    small = tmp_path / "a.csv"
    big = tmp_path / "b.csv"
    pd.DataFrame({"x": range(10)}).to_csv(small, index=False)
    pd.DataFrame({"x": range(100_000)}).to_csv(big, index=False)
    plan = list(Dataset.Tabular.from_delimited_files(str(tmp_path)).plan("100KB"))
    assert plan[0] == CsvBatch(0, str(small), 0, None)
    assert all(b.path == str(big) for b in plan[1:])
    assert len(plan) == 1 + -(-big.stat().st_size // (100 * 1024))


def test_parquet_plan_splits_by_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    table = pa.table({"x": list(range(40_000))})
    pq.write_table(table, path, row_group_size=10_000)
    plan = list(Dataset.Tabular.from_parquet_files(str(path)).plan(100))
    assert [b.row_groups for b in plan] == [(0,), (1,), (2,), (3,)]
    assert all(isinstance(b, ParquetBatch) and b.num_rows == 10_000 for b in plan)
    whole = list(Dataset.Tabular.from_parquet_files(str(path)).plan("1GB"))
    assert [b.row_groups for b in whole] == [(0, 1, 2, 3)]


def test_not_parquet_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        list(Dataset.Tabular.from_parquet_files(str(tmp_path)).plan())


def _cfg(**kw: object) -> ResolvedConfig:
    base: dict[str, object] = dict(
        entry_script="s.py",
        source_directory=None,
        error_threshold=-1,
        output_action="append_row",
        node_count=1,
        process_count_per_node=1,
        mini_batch_size=1,
        logging_level="INFO",
        run_invocation_timeout=60,
        run_max_try=3,
        append_row_file_name="o.txt",
        allowed_failed_count=None,
        allowed_failed_percent=None,
    )
    base.update(kw)
    return ResolvedConfig(**base)  # type: ignore[arg-type]


def test_thresholds() -> None:
    assert check_thresholds(Tally(10, items_failed=100), _cfg()) is None
    assert check_thresholds(Tally(10, items_failed=3), _cfg(error_threshold=3)) is None
    assert check_thresholds(Tally(10, items_failed=4), _cfg(error_threshold=3)) == (
        "error_threshold"
    )
    assert (
        check_thresholds(Tally(10, mini_batches_failed=2), _cfg(allowed_failed_count=1))
        == "allowed_failed_count"
    )
    # percent is only checked once every mini-batch is scheduled
    pct = _cfg(allowed_failed_percent=10)
    assert check_thresholds(Tally(10, mini_batches_failed=2), pct) is None
    assert (
        check_thresholds(Tally(10, mini_batches_failed=2, all_scheduled=True), pct)
        == "allowed_failed_percent"
    )
    assert (
        check_thresholds(Tally(10, mini_batches_failed=1, all_scheduled=True), pct)
        is None
    )


def test_config_validation(tmp_path: Path) -> None:
    script = write_script(tmp_path, "def init(): pass\ndef run(mb): return mb\n")
    ok = ParallelRunConfig(str(script), error_threshold=0, output_action="append_row")
    assert ok.run_max_try == 3 and ok.run_invocation_timeout == 60
    bad: list[tuple[dict[str, object], str]] = [
        ({"error_threshold": -2}, "error_threshold=-2 must be an int >= -1"),
        ({"error_threshold": "5"}, "error_threshold='5'"),
        ({"output_action": "append"}, "output_action='append' is not one of"),
        ({"allowed_failed_percent": 101}, "allowed_failed_percent=101 must be"),
        ({"allowed_failed_count": -5}, "allowed_failed_count=-5"),
        ({"run_max_try": 0}, "run_max_try=0"),
        ({"run_invocation_timeout": 0}, "run_invocation_timeout=0"),
        ({"node_count": 0}, "node_count=0"),
        ({"process_count_per_node": 0}, "process_count_per_node=0"),
        ({"mini_batch_size": "ten"}, "mini_batch_size='ten'"),
        ({"logging_level": "LOUD"}, "logging_level='LOUD'"),
        ({"append_row_file_name": "a/b.txt"}, "append_row_file_name='a/b.txt'"),
        ({"environment_variables": {"A": 1}}, "environment_variables must map"),
    ]
    for kw, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            ParallelRunConfig(str(script), **kw)  # type: ignore[arg-type]


def test_entry_script_checked_without_running_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ParallelRunConfig(str(tmp_path / "missing.py"))
    no_run = write_script(tmp_path, "def init(): pass\n", "a.py")
    with pytest.raises(ConfigError, match=r"does not define run\(\)"):
        ParallelRunConfig(str(no_run))
    broken = write_script(tmp_path, "def init(:\n", "b.py")
    with pytest.raises(ConfigError, match="not valid Python"):
        ParallelRunConfig(str(broken))
    # importing it would fail on the client; the check only parses it
    heavy = write_script(
        tmp_path,
        "import package_only_on_workers\ndef init(): pass\ndef run(mb): return mb\n",
        "c.py",
    )
    ParallelRunConfig(str(heavy))
    write_script(tmp_path / "src", "def init(): pass\ndef run(mb): return mb\n")
    with pytest.raises(ConfigError, match="source_directory="):
        ParallelRunConfig("score.py", source_directory=str(tmp_path / "nope"))
    ParallelRunConfig("score.py", source_directory=str(tmp_path / "src"))


def test_datasets_as_dask_collections(tmp_path: Path) -> None:
    pd.DataFrame({"x": range(50_000)}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"x": range(10)}).to_csv(tmp_path / "b.csv", index=False)
    tabular = Dataset.Tabular.from_delimited_files(str(tmp_path / "*.csv"))
    ddf = tabular.to_dask_dataframe("64KB")
    assert ddf.npartitions == len(list(tabular.plan("64KB"))) > 2
    parts = ddf.map_partitions(len).compute(scheduler="sync").tolist()
    assert sum(parts) == 50_010 and parts[-1] == 10  # b.csv alone
    make_files(tmp_path / "f", 7)
    bag = Dataset.File.from_files(str(tmp_path / "f")).to_bag(3)
    # one partition per mini-batch, holding its paths
    sizes = bag.map_partitions(lambda paths: [len(list(paths))])
    assert sizes.compute(scheduler="sync") == [3, 3, 1]


def test_recursive_globs_list_each_file_once(tmp_path: Path) -> None:
    top = tmp_path / "data"
    for rel in ("x.csv", "b/y.csv", "b/c/z.txt", "b/c/d/w.csv"):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text("n\n1\n")

    def names(path: object) -> list[str]:
        files = Dataset.File.from_files(path).files()
        return [str(Path(f).relative_to(top)) for f in files]

    everything = ["b/c/d/w.csv", "b/c/z.txt", "b/y.csv", "x.csv"]
    assert names(str(top / "**")) == everything
    assert names(str(top / "**" / "*.csv")) == ["b/c/d/w.csv", "b/y.csv", "x.csv"]
    with pytest.warns(UserWarning, match=r"names 3 file\(s\) more than once"):
        assert names([str(top / "**"), str(top / "b")]) == everything
    assert len(list(Dataset.File.from_files(str(top / "**")).plan(1))) == 4


@pytest.mark.parametrize("path", [None, 42, [None], b"images/", {"a": 1}])
def test_what_names_no_file_is_refused(path: object) -> None:
    with pytest.raises(InputError, match=r"path=.* is not a path; pass a file"):
        Dataset.File.from_files(path)
    with pytest.raises(InputError, match="is not a path"):
        Dataset.Tabular.from_delimited_files(path, validate=False)


def test_a_bound_step_describes_its_job_as_one_frozen_value(tmp_path: Path) -> None:
    # the engine reads only the description; what it chooses stays on the job
    import dataclasses

    from daskrun import ParallelRunStep
    from daskrun.engine.description import JobDescription

    make_files(tmp_path / "in", 5)
    script = write_script(
        tmp_path / "src", "def init(): pass\ndef run(mini_batch): return mini_batch\n"
    )
    cfg = ParallelRunConfig(str(script), mini_batch_size=2, output_action="append_row")
    ds = Dataset.File.from_files(str(tmp_path / "in"))
    step = ParallelRunStep("describe", cfg, inputs=[ds], output=str(tmp_path / "out"))
    described = step.bind({}, run_id="describe_1").describe(auto_recorded={"x": 1})
    assert isinstance(described, JobDescription)
    assert (described.run_id, described.name) == ("describe_1", "describe")
    assert described.input_type is step.input_type
    assert len(described.inputs) == 1
    assert described.auto_recorded == {"x": 1}
    assert described.own_output() == f"{tmp_path / 'out'}/parallel_run_step.txt"
    assert described.plan()[1] == 3  # 5 files, 2 a mini-batch
    with pytest.raises(dataclasses.FrozenInstanceError):
        described.output = "elsewhere"  # type: ignore[misc]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.text(st.sampled_from('ab,"\r\n /é'), min_size=1, max_size=8),
            st.integers(0, 2**40),
            st.text(st.sampled_from('0123456789",x'), min_size=1, max_size=6),
        ),
        max_size=6,
    )
)
def test_the_listing_reads_back_what_was_written(
    rows: list[tuple[str, int, str]],
) -> None:
    """Rows joined as they are where nothing needs quoting, quoted by the
    csv module where a path or an ETag holds a comma, a quote or a line
    end: read back the same either way."""
    import tempfile

    rows = list({path: (path, size, stamp) for path, size, stamp in rows}.values())
    with tempfile.TemporaryDirectory() as folder:
        ledger = PlanLedger(Path(folder))
        ledger.files(rows[: len(rows) // 2])
        ledger.files(rows[len(rows) // 2 :])
        ledger.commit()
        expected = {path: (str(size), stamp) for path, size, stamp in rows}
        assert read_listing(Path(folder)) == expected


@pytest.mark.parametrize("renamed", [False, True])
def test_a_ledger_a_kill_left_is_promoted_with_its_digest(
    tmp_path: Path, renamed: bool
) -> None:
    """The ledger a killed client streamed (or was committing: one file
    renamed, not the other) becomes the run's, with the digest it would
    have committed."""
    import os

    from daskrun.engine.ledger import promote_partial, read_plan

    assert promote_partial(tmp_path) is None  # nothing was streamed
    ledger = PlanLedger(tmp_path)
    for i in range(3):
        ledger.files([(f"f{i}", i, "7")])
        ledger.mini_batch(f"f{i}", [(i, "7")])
    ledger.flush()  # what a kill leaves: written through, not closed
    if renamed:
        os.replace(tmp_path / "inputs.csv.new", tmp_path / "inputs.csv")
    assert promote_partial(tmp_path) == ledger.digest
    assert len(read_plan(tmp_path)) == 3
    assert read_listing(tmp_path) == {f"f{i}": (str(i), "7") for i in range(3)}
    ledger.close()
