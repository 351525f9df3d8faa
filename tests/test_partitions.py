"""Partitioned data sets: ``partition_format``, ``partition_by`` and
``ParallelRunConfig(partition_keys=...)``, on real worker processes, with
``run(mini_batch, mini_batch_context)`` as Azure ML entry scripts write it."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from distributed import LocalCluster
from hypothesis import given, settings
from hypothesis import strategies as st

from daskrun import (
    ConfigError,
    Dataset,
    Datastore,
    InputError,
    ParallelRunConfig,
    ParallelRunStep,
    PipelineParameter,
    Workspace,
    resume,
)
from daskrun.backends.inputs.batches import plan_partitions
from daskrun.backends.inputs.partitions import PartitionFormat

from .helpers import daskrun, run_step, write_script

# run(mini_batch, mini_batch_context) writing one JSON line per item: the
# mini-batch's context, and what ITEM says of the item
CONTEXT_SCRIPT = """
import json, os

def init():
    pass

def context(c):
    # the partition's data set: its kind, and its files or rows
    ds = c.dataset
    size = None if ds is None else len(
        ds.to_path() if hasattr(ds, "to_path") else ds.to_pandas_dataframe())
    return {"keys": c.partition_key_value, "index": c.minibatch_index,
            "dataset": None if ds is None else [type(ds).__name__, size]}

def run(mini_batch, mini_batch_context):
    return [json.dumps({**context(mini_batch_context), **ITEM}, default=str)
            for item in ITEMS]
"""
FILE_SCRIPT = CONTEXT_SCRIPT.replace("ITEMS", "mini_batch").replace(
    "ITEM", '{"file": os.path.basename(item), "n": int(open(item).read())}'
)
TABLE_SCRIPT = CONTEXT_SCRIPT.replace("ITEMS", 'mini_batch.to_dict("records")').replace(
    "ITEM",
    '{"rows": len(mini_batch), "columns": sorted(mini_batch.columns), '
    '"row": {k: (v if isinstance(v, str) else int(v)) for k, v in item.items()}}',
)


def _batches(lines: list[dict[str, object]]) -> list[dict[str, object]]:
    """The mini-batches the lines came from, in order: keys, index and
    dataset, and how many lines each gave."""
    found: list[dict[str, object]] = []
    for line in lines:
        head = {k: line[k] for k in ("keys", "index", "dataset")}
        if found and {k: found[-1][k] for k in head} == head:
            found[-1]["lines"] += 1  # type: ignore[operator]
        else:
            found.append({**head, "lines": 1})
    return found


USERS, GENRES = ("alice", "bob", "carol"), ("jazz", "rock")


def _audio(folder: Path) -> list[tuple[str, str, str, int]]:
    """Small fake ``<user>/<genre>/<name>.wav`` files holding a number; one
    combination (carol/jazz) has none. Returns ``(user, genre, name, n)``."""
    made = []
    n = 0
    for user in USERS:
        for genre in GENRES:
            if (user, genre) == ("carol", "jazz"):
                continue
            for take in range(1 + len(user) % 3 + len(genre) % 2):
                n += 1
                path = folder / user / genre / f"take{take}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(str(n))
                made.append((user, genre, f"take{take}.wav", n))
    return made


def _lines(run: object) -> list[dict[str, object]]:
    path = run.output_path  # type: ignore[attr-defined]
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_file_partitions_one_mini_batch_each_in_key_order(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    made = _audio(tmp_path / "audio")
    ds = Dataset.File.from_files(
        str(tmp_path / "audio"), partition_format="/{user}/{genre}/{fname}.wav"
    )
    assert ds.partition_keys == ["user", "genre", "fname"]
    run = run_step(
        tmp_path,
        FILE_SCRIPT,
        ds.as_named_input("audio"),
        partition_keys=["user", "genre"],
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error
    # the reference: a plain loop over the files, grouped and sorted by key
    groups: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for user, genre, name, n in made:
        groups.setdefault((user, genre), []).append((name, n))
    expected = [
        {
            "keys": {"user": user, "genre": genre},
            "index": i,
            "dataset": ["FileDataset", len(groups[user, genre])],
            "file": name,
            "n": n,
        }
        for i, (user, genre) in enumerate(sorted(groups))
        for name, n in sorted(groups[user, genre])
    ]
    lines = _lines(run)
    assert lines == expected  # each file once, partitions in key order
    assert [b["lines"] for b in _batches(lines)] == [
        len(groups[k]) for k in sorted(groups)
    ]
    assert run.mini_batches_total == len(groups) == 5
    assert run.items_total == len(made)


def test_partition_by_from_csv_then_partitioned_run(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    ws = Workspace.create(tmp_path / "ws")
    store = Datastore.register_local(ws, "data", tmp_path / "store")
    frame = pd.DataFrame(
        {
            "region": [["north", "south", "east"][i % 3] for i in range(60)],
            "product": [f"p{i % 4}" for i in range(60)],
            "amount": [i * 7 % 23 for i in range(60)],
        }
    )
    frame.to_csv(tmp_path / "sales.csv", index=False)
    sales = Dataset.Tabular.from_delimited_files(str(tmp_path / "sales.csv"))

    parts = sales.partition_by(
        ["region", "product"], store.path("by_region/"), name="sales_parts"
    )
    assert parts.partition_keys == ["region", "product"]
    assert parts.partition_format == "/region={region}/product={product}/data.parquet"
    assert (tmp_path / "store/by_region/region=east/product=p0/data.parquet").exists()
    registered = Dataset.get_by_name(ws, "sales_parts")
    assert registered.partition_keys == ["region", "product"]  # spec round trip

    run = run_step(
        tmp_path,
        TABLE_SCRIPT,
        registered,
        partition_keys=["region"],
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error
    lines = _lines(run)
    reference = frame.groupby("region", sort=True)["amount"].agg(["size", "sum"])
    assert _batches(lines) == [
        {
            "keys": {"region": r},
            "index": i,
            "dataset": ["TabularDataset", n],
            "lines": n,
        }
        for i, (r, n) in enumerate(reference["size"].items())
    ]
    got = pd.DataFrame([line["row"] for line in lines])
    assert [line["keys"]["region"] for line in lines] == list(got["region"])
    assert {tuple(line["columns"]) for line in lines} == {
        ("amount", "product", "region")
    }
    assert all(
        line["rows"] == reference["size"][line["keys"]["region"]] for line in lines
    )
    by_region = got.groupby("region", sort=True)["amount"].agg(["size", "sum"])
    pd.testing.assert_frame_equal(by_region, reference)
    # every row exactly once (the partition folders keep product apart)
    pd.testing.assert_frame_equal(
        got.sort_values(list(got.columns)).reset_index(drop=True),
        frame[list(got.columns)].sort_values(list(got.columns)).reset_index(drop=True),
    )
    assert run.items_total == len(frame)


def test_date_parts_and_a_pipeline_parameter_for_the_keys(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    days = ["2024/01/31", "2024/02/01", "2023/12/30"]
    for n, day in enumerate(days):
        for region in ("eu", "us"):
            path = tmp_path / "logs" / region / day / f"{n}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(str(n))
    ds = Dataset.File.from_files(
        str(tmp_path / "logs"), partition_format="/{region}/{day:yyyy/MM/dd}/{n}.txt"
    )
    assert dict(ds.partition_values())[str(tmp_path / "logs/eu/2024/02/01/1.txt")] == {
        "region": "eu",
        "day": datetime(2024, 2, 1),
        "n": "1",
    }
    keys = PipelineParameter("keys", '["region", "day"]')
    script = write_script(tmp_path, FILE_SCRIPT)
    cfg = ParallelRunConfig(
        str(script),
        output_action="append_row",
        partition_keys=keys,
        compute_target=cluster,
    )
    step = ParallelRunStep("by-day", cfg, inputs=[ds], output=str(tmp_path / "out"))
    assert step.bind({}).plan()[1] == 6
    run = step.run(pipeline_parameters={"keys": "day"})  # one key: 3 partitions
    assert run.status == "Completed", run.error
    got = _batches(_lines(run))
    assert got == [
        {
            "keys": {"day": str(datetime(y, m, d))},
            "index": i,
            "dataset": ["FileDataset", 2],
            "lines": 2,
        }
        for i, (y, m, d) in enumerate([(2023, 12, 30), (2024, 1, 31), (2024, 2, 1)])
    ]


def test_two_parameter_run_without_partitions_gets_no_keys(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    made = _audio(tmp_path / "audio")
    run = run_step(
        tmp_path,
        FILE_SCRIPT,
        Dataset.File.from_files(str(tmp_path / "audio")),
        mini_batch_size=4,
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error
    got = _batches(_lines(run))
    sizes = [min(4, len(made) - i) for i in range(0, len(made), 4)]
    assert [(b["keys"], b["index"], b["lines"]) for b in got] == [
        ({}, i, n) for i, n in enumerate(sizes)
    ]


def test_refused_before_any_task_runs(tmp_path: Path) -> None:
    _audio(tmp_path / "audio")
    script = write_script(tmp_path, FILE_SCRIPT)
    fmt = "/{user}/{genre}/{fname}.wav"
    ds = Dataset.File.from_files(str(tmp_path / "audio"), partition_format=fmt)

    with pytest.raises(ConfigError, match=r"partition_keys=\['user'\] and mini_batch"):
        ParallelRunConfig(str(script), partition_keys=["user"], mini_batch_size=5)

    cfg = ParallelRunConfig(str(script), partition_keys=["user", "album"])
    with pytest.raises(ConfigError, match="no key 'album'; its keys are user, genre"):
        ParallelRunStep("bad", cfg, inputs=[ds], output=str(tmp_path / "out"))

    plain = Dataset.File.from_files(str(tmp_path / "audio"))
    with pytest.raises(ConfigError, match="is not partitioned"):
        ParallelRunStep("bad", cfg, inputs=[plain], output=str(tmp_path / "out"))

    (tmp_path / "audio" / "stray.wav").write_text("0")
    stray = str(tmp_path / "audio" / "stray.wav")
    with pytest.raises(InputError) as e:
        Dataset.File.from_files(str(tmp_path / "audio"), partition_format=fmt)
    assert repr(stray) in str(e.value) and repr(fmt) in str(e.value)

    for bad in ("/{user}/{user}.wav", "/{d:yyyy/yyyy}/x", "/{d:qq}/x", "x.wav"):
        with pytest.raises(ConfigError, match="partition_format"):
            PartitionFormat(bad)


RESUMED_SCRIPT = """
import os, uuid

def init():
    pass

def run(mini_batch, mini_batch_context):
    keys = mini_batch_context.partition_key_value
    calls = os.environ["CALLS"]
    open(os.path.join(calls, f"{keys['user']}.{uuid.uuid4().hex}"), "w").close()
    if keys["user"] == "bob" and not os.path.exists(os.environ["FIXED"]):
        raise ValueError("bob is not fixed yet")
    where = f"{keys['user']}/{keys['genre']}"
    return [f"{where}: {os.path.basename(p)}" for p in mini_batch]
"""


def test_failed_partition_resumed_exactly_once(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    made = _audio(tmp_path / "audio")
    (tmp_path / "calls").mkdir()
    ds = Dataset.File.from_files(
        str(tmp_path / "audio"), partition_format="/{user}/{genre}/{fname}.wav"
    )
    first = run_step(
        tmp_path,
        RESUMED_SCRIPT,
        ds,
        partition_keys="user,genre",
        error_threshold=-1,
        run_max_try=1,
        compute_target=cluster,
        environment_variables={
            "CALLS": str(tmp_path / "calls"),
            "FIXED": str(tmp_path / "fixed"),
        },
    )
    assert first.mini_batches_failed == 2  # bob/jazz, bob/rock
    expected = sorted(f"{u}/{g}: {name}" for u, g, name, _ in made)
    out = Path(first.output_path or tmp_path / "out/parallel_run_step.txt")
    assert out.read_text().splitlines() == [
        line for line in expected if not line.startswith("bob")
    ]

    (tmp_path / "fixed").touch()
    again = resume(first.run_id, retry_failed=True, compute_target=cluster)
    assert again.status == "Completed" and again.mini_batches_failed == 0
    assert out.read_text().splitlines() == expected  # in order, each once
    calls = sorted(p.name.split(".")[0] for p in (tmp_path / "calls").iterdir())
    assert calls == sorted(["alice"] * 2 + ["bob"] * 4 + ["carol"])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.sampled_from(["x", "y", "zz", "Y"])),
        min_size=1,
        max_size=40,
    )
)
def test_grouping_equals_pandas_groupby(rows: list[tuple[str, str]]) -> None:
    files = [(f"f{i}", {"k": k, "m": m}) for i, (k, m) in enumerate(rows)]
    batches = plan_partitions(files, ["k", "m"])
    frame = pd.DataFrame(rows, columns=["k", "m"])
    reference = [
        (dict(zip(["k", "m"], combo, strict=True)), [f"f{i}" for i in group.index])
        for combo, group in frame.groupby(["k", "m"], sort=True)
    ]
    assert [(b.partition_key_value, b.paths) for b in batches] == reference
    assert [b.index for b in batches] == list(range(len(reference)))


def test_hive_values_that_cannot_name_a_folder(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "ws")
    store = Datastore.register_local(ws, "data", tmp_path / "store")
    pd.DataFrame({"k": ["a/b", "c"], "v": [1, 2]}).to_csv(
        tmp_path / "t.csv", index=False
    )
    ds = Dataset.Tabular.from_delimited_files(str(tmp_path / "t.csv"))
    with pytest.raises(InputError, match="column 'k' holds 'a/b'"):
        ds.partition_by(["k"], (store, "parts"), show_progress=False)
    with pytest.raises(ConfigError, match="has no column 'nope'; its columns are k, v"):
        ds.partition_by(["nope"], (store, "parts2"), show_progress=False)
    assert os.listdir(tmp_path / "store") in ([], ["parts"])


def test_cli_partition_keys(
    tmp_path: Path, runs_dir: Path, cluster: LocalCluster
) -> None:
    made = _audio(tmp_path / "audio")
    write_script(tmp_path, FILE_SCRIPT)
    result = daskrun(
        "run",
        "score.py",
        "--input",
        "audio",
        "--partition-format",
        "/{user}/{genre}/{fname}.wav",
        "--partition-keys",
        "user",
        "--scheduler",
        cluster.scheduler_address,
        "--output",
        "out",
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out/parallel_run_step.txt").read_text().splitlines()
    batches = _batches([json.loads(line) for line in lines])
    assert [(b["keys"], b["lines"]) for b in batches] == [
        ({"user": user}, sum(1 for m in made if m[0] == user)) for user in USERS
    ]
