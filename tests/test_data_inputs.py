"""Inputs at their edges: what a listing takes (symlink loops, FIFOs, broken
links, repeated paths, folders below a ``.daskrun``), partition keys that
meet columns, ``partition_by`` all or nothing, pandas dtypes a run record
can keep, and the dead-letter data set of remote or home-folder runs. Bad
input is one line naming it and the fix, before anything is written."""

from __future__ import annotations

import glob
import os
import re
import tempfile
import uuid
import warnings
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from adlfs import AzureBlobFileSystem
from distributed import LocalCluster
from hypothesis import given, settings
from hypothesis import strategies as st

from daskrun import ConfigError, Dataset, Datastore, InputError, Workspace
from daskrun.backends.inputs.partitions import PartitionFormat

from .helpers import (
    daskrun,
    make_files,
    poison_files,
    poison_rows,
    run_step,
    write_script,
)
from .scripts import POISON_SCRIPT, ROWS_SCRIPT

NAMES_SCRIPT = """
import os

def init():
    pass

def run(mini_batch):
    return [os.path.basename(p) for p in mini_batch]
"""


def _names(files: list[str], top: Path) -> list[str]:
    return [str(Path(f).relative_to(top)) for f in files]


# --- listing ----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_recursive_globs_over_symlink_loops_list_each_file_once(
    tmp_path: Path,
) -> None:
    top = tmp_path / "data"
    make_files(top / "a", 2)
    make_files(top / "b" / "c", 2, prefix="g")
    (top / "a" / "up").symlink_to(top)  # two loops: glob's "**" never ended
    (top / "b" / "c" / "top").symlink_to(tmp_path)
    (top / "link").symlink_to(top / "a")  # a linked folder, as os.walk: not entered
    a = ["a/f00000.txt", "a/f00001.txt"]
    c = ["b/c/g00000.txt", "b/c/g00001.txt"]
    linked = ["link/f00000.txt", "link/f00001.txt"]
    for pattern, expected in (
        ("**/*.txt", a + c),
        ("**", a + c),
        ("**/c/*.txt", c),
        # a wildcard before any "**" reads a linked folder it matches, as glob
        ("*/**/*.txt", a + c + linked),
        ("l*/*.txt", linked),
    ):
        files = Dataset.File.from_files(str(top / pattern)).files()
        assert _names(files, top) == expected, pattern


_NAMES = ("a", "b", "ab", ".h", "x.csv", "y.txt", ".z.csv")
_PATTERNS = (
    *("*", "*.csv", ".*", "a*", "?"),  # one wildcard part: one listing
    *("**", "**/*.csv", "*/**", "a*/**/*.txt", "**/a/*"),
)


@settings(max_examples=40, deadline=None)
@given(
    paths=st.lists(
        st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4),
        min_size=1,
        max_size=20,
    ),
    pattern=st.sampled_from(_PATTERNS),
)
def test_local_globs_match_what_glob_matches(
    paths: list[list[str]], pattern: str
) -> None:
    """The one-walk glob lists what ``glob.glob(recursive=True)`` matches,
    with the folders it matches listed whole, on trees without links."""
    with tempfile.TemporaryDirectory() as top:
        for parts in paths:
            path = os.path.join(top, *parts)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if not os.path.isdir(path):
                    Path(path).write_text("x")
            except (FileExistsError, NotADirectoryError):
                pass  # a file where a folder would go, or the other way
        expected: set[str] = set()
        for found in glob.glob(os.path.join(top, pattern), recursive=True):
            if os.path.isdir(found):
                for folder, _, files in os.walk(found):
                    expected.update(os.path.join(folder, f) for f in files)
            else:
                expected.add(os.path.normpath(found))
        try:
            listed = Dataset.File.from_files(os.path.join(top, pattern)).files()
        except InputError:
            listed = []
        assert listed == sorted(expected)


def test_fifos_and_broken_links_are_refused_when_listed(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "in", 3)
    fifo = tmp_path / "in" / "f00001x.txt"
    os.mkfifo(fifo)
    for path in (tmp_path / "in", tmp_path / "in" / "*.txt", fifo):
        with pytest.raises(InputError, match=rf"input '{fifo}' is a FIFO, not a"):
            Dataset.File.from_files(str(path))
    write_script(tmp_path, NAMES_SCRIPT)
    refused = daskrun(
        "run", "score.py", "--input", "in", "--output", "out",
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert f"'{fifo}' is a FIFO" in refused.stderr
    assert not (tmp_path / "out").exists()
    fifo.unlink()

    broken = tmp_path / "in" / "gone.txt"
    broken.symlink_to(tmp_path / "nowhere.txt")
    for path in (tmp_path / "in", broken):
        with pytest.raises(InputError, match=rf"'{broken}' is a broken symbolic link"):
            Dataset.Tabular.from_delimited_files(str(path))


def test_repeated_paths_in_a_list_warn_once_with_their_count(
    tmp_path: Path,
) -> None:
    files = make_files(tmp_path / "in", 3)
    given = [str(files[0]), str(tmp_path / "in"), str(files[0]), str(files[2])]
    with pytest.warns(UserWarning) as caught:
        ds = Dataset.File.from_files(given)
    assert len(caught) == 1
    assert "names 3 file(s) more than once" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's line
    assert ds.files() == [str(f) for f in files]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Dataset.File.from_files([str(files[0]), str(files[1])])


def test_inputs_below_a_daskrun_folder_are_listed(tmp_path: Path) -> None:
    home = tmp_path / "home" / ".daskrun" / "data"
    made = make_files(home, 2)
    for path in (home, home / "*.txt", made[0]):
        assert Dataset.File.from_files(str(path)).files()[0] == str(made[0])


def test_a_workspace_below_a_daskrun_folder_lists_its_datastore(
    tmp_path: Path,
) -> None:
    ws = Workspace.create(tmp_path / "home" / ".daskrun" / "ws")
    store = ws.get_default_datastore()
    make_files(tmp_path / "src", 2)
    store.upload(str(tmp_path / "src"), "in", show_progress=False)
    ds = Dataset.File.from_files(store.path("in/"))
    assert [Path(f).name for f in ds.files()] == ["f00000.txt", "f00001.txt"]
    assert store.download(tmp_path / "back", "in", show_progress=False) == 2


def test_dataset_reprs_name_their_paths(tmp_path: Path) -> None:
    make_files(tmp_path / "in", 3)
    ds = Dataset.File.from_files(str(tmp_path / "in"))
    assert repr(ds) == f"FileDataset({str(tmp_path / 'in')!r})"
    lazy = Dataset.Tabular.from_delimited_files(
        [str(tmp_path / n) for n in "abcd"], validate=False
    )
    shown = ", ".join(repr(str(tmp_path / n)) for n in "abc")
    assert repr(lazy) == f"TabularDataset([{shown}, ... 1 more])"
    with pytest.raises(ConfigError, match=r"input FileDataset\('.*in'\) is not"):
        run_step(tmp_path, NAMES_SCRIPT, ds, partition_keys=["user"])


# --- partitions -------------------------------------------------------------


def test_a_partition_key_named_like_a_column_is_refused(tmp_path: Path) -> None:
    for month, rows in (("2024-01", "m,v\nx,1\ny,2\n"), ("2024-02", "m,v\nz,3\n")):
        (tmp_path / "in" / month).mkdir(parents=True)
        (tmp_path / "in" / month / "part.csv").write_text(rows)
    pattern = "/{m:yyyy-MM}/{name}.csv"
    first = tmp_path / "in" / "2024-01" / "part.csv"
    fix = f"partition_format='{pattern}': key 'm' is also a column of '{first}'"
    with pytest.raises(InputError, match=rf"^{fix}, whose values it would replace"):
        Dataset.Tabular.from_delimited_files(
            str(tmp_path / "in"), partition_format=pattern
        )
    lazy = Dataset.Tabular.from_delimited_files(
        str(tmp_path / "in"), partition_format=pattern, validate=False
    )
    with pytest.raises(InputError, match="key 'm' is also a column"):
        lazy.to_pandas_dataframe()  # never read with the column replaced
    renamed = Dataset.Tabular.from_delimited_files(
        str(tmp_path / "in"), partition_format="/{month:yyyy-MM}/{name}.csv"
    )
    assert list(renamed.to_pandas_dataframe()["m"]) == ["x", "y", "z"]
    frame = pd.DataFrame({"m": [1, 2]})
    frame.to_parquet(tmp_path / "in" / "2024-01" / "p.parquet")
    with pytest.raises(InputError, match="key 'm' is also a column of '.*p.parquet'"):
        Dataset.Tabular.from_parquet_files(
            str(tmp_path / "in" / "*" / "*.parquet"),
            partition_format="/{m:yyyy-MM}/p.parquet",
        )


@pytest.mark.parametrize(
    ("pattern", "blamed"),
    [
        ("/{user/{fname}.wav", " has an unbalanced '{'"),
        ("/user}/{fname}.wav", " has an unbalanced '}'"),
        ("/{}/{fname}.wav", ": {} names no key"),
    ],
)
def test_a_malformed_partition_format_blames_the_pattern(
    tmp_path: Path, pattern: str, blamed: str
) -> None:
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "take.wav").write_text("x")
    blamed = re.escape(blamed)
    with pytest.raises(ConfigError, match=rf"^partition_format='.*'{blamed}; "):
        Dataset.File.from_files(str(tmp_path), partition_format=pattern)
    with pytest.raises(ConfigError, match=blamed):
        PartitionFormat(pattern)


def _store(tmp_path: Path) -> Datastore:
    ws = Workspace.create(tmp_path / "ws")
    return Datastore.register_local(ws, "data", tmp_path / "store")


def test_partition_by_keeps_every_row_of_key_columns_only(tmp_path: Path) -> None:
    store = _store(tmp_path)
    keys = ["a", "b", "a", "c", "a", "b"]
    pd.DataFrame({"k": keys}).to_csv(tmp_path / "t.csv", index=False)
    ds = Dataset.Tabular.from_delimited_files(str(tmp_path / "t.csv"))
    parts = ds.partition_by(["k"], store.path("by_k/"), show_progress=False)
    got = parts.to_pandas_dataframe()
    assert sorted(got["k"]) == sorted(keys)
    batches = [b.num_rows for b in parts.plan()]  # the row groups say so too
    assert sorted(batches) == [1, 2, 3]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("", "nan"),  # an empty field: NaN
        ("z/y", "'z/y'"),
        ("z" * 300, "'zzzz"),
        ("<NA>", "<NA>"),
    ],
)
def test_partition_by_is_all_or_nothing(tmp_path: Path, value: str, shown: str) -> None:
    store = _store(tmp_path)
    values = ["a", "b", "c", value]
    path = tmp_path / "t.csv"
    pd.DataFrame({"k": values, "v": range(4)}).to_csv(path, index=False)
    options = {"dtype": {"k": "string"}} if value == "<NA>" else {}
    if value == "<NA>":
        path.write_text(path.read_text().replace("<NA>", ""))
    ds = Dataset.Tabular.from_delimited_files(str(path), **options)
    with pytest.raises(InputError, match=rf"^partition_by: column 'k' holds {shown}"):
        ds.partition_by(["k"], (store, "parts"), show_progress=False)
    assert not [f for _, _, fs in os.walk(tmp_path / "store") for f in fs]
    # fixed, the same target is taken: nothing of the failure was left there
    path.write_text("k,v\na,0\nb,1\nc,2\nd,3\n")
    fixed = Dataset.Tabular.from_delimited_files(str(path))
    parts = fixed.partition_by(["k"], (store, "parts"), show_progress=False)
    assert sorted(parts.to_pandas_dataframe()["k"]) == ["a", "b", "c", "d"]


def test_partition_by_removes_what_it_wrote_when_a_write_fails(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    path = tmp_path / "t.csv"
    path.write_text("k,v\na,0\nb,1\nc,2\n")
    # a folder where the last group's file goes: the target holds no file,
    # and the third write fails after two succeeded
    (tmp_path / "store" / "parts" / "k=c" / "data.parquet").mkdir(parents=True)
    ds = Dataset.Tabular.from_delimited_files(str(path))
    with pytest.raises(OSError):
        ds.partition_by(["k"], (store, "parts"), show_progress=False)
    assert not [f for _, _, fs in os.walk(tmp_path / "store") for f in fs]


# --- pandas options a run record keeps ---------------------------------------

DTYPES_SCRIPT = """
def init():
    pass

def run(df):
    return [f"{c}:{df[c].dtype}" for c in df.columns][: len(df)]
"""


def test_dtypes_are_recorded_by_name(tmp_path: Path, cluster: LocalCluster) -> None:
    (tmp_path / "t.csv").write_text("id,name\n1,a\n2,b\n")
    for dtype, shown in (({"id": np.int32}, "id:int32"), (str, "id:str")):
        ds = Dataset.Tabular.from_delimited_files(str(tmp_path / "t.csv"), dtype=dtype)
        for _ in range(2):  # the output folder is free again after each run
            run = run_step(
                tmp_path, DTYPES_SCRIPT, ds, compute_target=cluster.scheduler_address
            )
            assert run.status == "Completed", run.error
            assert Path(run.output_path or "").read_text().splitlines()[0] == shown
            assert not (tmp_path / "out" / ".daskrun").exists()
    with pytest.raises(ConfigError, match=r"^pandas option dtype=CategoricalDtype"):
        Dataset.Tabular.from_delimited_files(
            str(tmp_path / "t.csv"), dtype={"name": pd.CategoricalDtype(["a"])}
        )
    with pytest.raises(ConfigError, match=r"^pandas option converters=\{'id'"):
        Dataset.Tabular.from_delimited_files(
            str(tmp_path / "t.csv"), converters={"id": int}
        )


def test_a_run_record_that_cannot_be_saved_frees_the_output(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    (tmp_path / "t.csv").write_text("id,name\n1,a\n2,b\n")
    ds = Dataset.Tabular.from_delimited_files(str(tmp_path / "t.csv"))
    ds.pandas_kwargs["converters"] = {"id": int}  # behind the check's back
    with pytest.raises(TypeError, match="not JSON serializable"):
        run_step(tmp_path, DTYPES_SCRIPT, ds, compute_target=cluster.scheduler_address)
    assert not (tmp_path / "out" / ".daskrun" / "lock").exists()
    del ds.pandas_kwargs["converters"]
    run = run_step(
        tmp_path, DTYPES_SCRIPT, ds, compute_target=cluster.scheduler_address
    )
    assert run.status == "Completed", run.error


# --- the dead-letter data set ----------------------------------------------


def test_failed_items_with_runs_below_a_daskrun_folder(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    """The default runs folder is ~/.daskrun/runs: the dead-letter file
    written there is an input like any other."""
    poison_rows(tmp_path / "in" / "rows.csv", 100, {12, 87})
    with dask.config.set({"daskrun.runs-dir": str(tmp_path / "home/.daskrun/runs")}):
        run = run_step(
            tmp_path,
            ROWS_SCRIPT,
            Dataset.Tabular.from_delimited_files(str(tmp_path / "in")),
            compute_target=cluster.scheduler_address,
            error_threshold=-1,
            run_max_try=1,
        )
        assert "/home/.daskrun/runs/" in run.logs_dir
        dead = run.failed_items()
    assert list(dead.to_pandas_dataframe()["id"]) == [12, 87]


def test_failed_items_of_a_remote_run_ask_for_credentials(
    tmp_path: Path, cluster: LocalCluster, azurite: str
) -> None:
    fs = AzureBlobFileSystem(connection_string=azurite)
    name = f"c{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    names = poison_files(tmp_path / "in", 6, {4})
    for file in names:
        fs.pipe_file(f"{name}/in/{file}", (tmp_path / "in" / file).read_bytes())
    options = {"connection_string": azurite}
    run = run_step(
        tmp_path,
        POISON_SCRIPT,
        Dataset.File.from_files(f"abfs://{name}/in", storage_options=options),
        compute_target=cluster.scheduler_address,
        error_threshold=-1,
        run_max_try=1,
    )
    assert run.items_failed == 1, run.error
    fix = re.escape("pass their storage_options to failed_items(), since run")
    with pytest.raises(ConfigError, match=rf"^run '{run.run_id}' reads remote .*{fix}"):
        run.failed_items()
    dead = run.failed_items(storage_options=options)
    assert [p.rsplit("/", 1)[1] for p in dead.files()] == [names[4]]
