"""CSV mini-batches hold every row of the file exactly once: whatever the
cut, line ending, quoting or pandas options, the rows of all mini-batches
equal what pandas reads from the whole file."""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import zstandard
from distributed import LocalCluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daskrun import ConfigError, Dataset

from .helpers import run_step


def _chunks(path: Path, size: int, **kwargs: Any) -> tuple[int, pd.DataFrame]:
    """The number of mini-batches at ``size`` bytes, and their rows."""
    from daskrun.backends.inputs.datasets import read_tabular

    ds = Dataset.Tabular.from_delimited_files(str(path), **kwargs)
    plan = list(ds.plan(size))
    frames = [read_tabular(b, {}, ds.pandas_kwargs) for b in plan]
    return len(plan), pd.concat(frames, ignore_index=True)


def _assert_same_rows(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    # per-chunk dtypes may differ (a chunk without NaN stays int): values count
    pd.testing.assert_frame_equal(
        got.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False
    )


def _every_cut(path: Path, **kwargs: Any) -> None:
    """Rows equal pandas' whole-file read at every mini-batch size from one
    byte to the whole file."""
    pandas_kwargs = dict(kwargs)
    header = pandas_kwargs.pop("header", True)
    as_pandas = (
        {} if header is True else {"header": None if header is False else header}
    )
    expected = pd.read_csv(path, **pandas_kwargs, **as_pandas)
    nbytes = path.stat().st_size
    cut_at_least_once = False
    for size in range(1, nbytes + 2):
        n, got = _chunks(path, size, header=header, **pandas_kwargs)
        cut_at_least_once |= n > 1
        try:
            _assert_same_rows(got, expected)
        except AssertionError as e:
            raise AssertionError(f"mini_batch_size={size} ({n} mini-batches)") from e
    assert cut_at_least_once


QUOTED = (
    "id,text,n\n"
    + "".join(
        f'{i},"line one\nline ""two"", and, commas {i}",{i * 2}\n' for i in range(12)
    )
    + '12,"ends with a newline\n",24\n'
    + "13,plain,26\n"
)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_quoted_newlines_split_exactly_at_every_cut(
    tmp_path: Path, newline: str
) -> None:
    path = tmp_path / "quoted.csv"
    path.write_bytes(QUOTED.replace("\n", newline).encode())
    _every_cut(path)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings_split_exactly(tmp_path: Path, newline: str) -> None:
    path = tmp_path / "plain.csv"
    rows = "".join(f"{i},{i * 3},word{i}{newline}" for i in range(3000))
    path.write_bytes(f"a,b,c{newline}{rows}".encode())
    n, got = _chunks(path, 1024)
    assert n >= path.stat().st_size // 1024 - 2  # cut into ~1 KiB pieces
    _assert_same_rows(got, pd.read_csv(path))
    assert len(got) == 3000


OPTION_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "comment": (
        "# made by hand\na,b\n1,x\n# a note\n2,y # inline\n3,z\n#\n4,w\n",
        {"comment": "#"},
    ),
    "skiprows": ("junk line\nmore, junk\na,b\n1,x\n2,y\n3,z\n4,w\n", {"skiprows": 2}),
    "header-none-names": (
        "1,x\n2,y\n3,z\n4,w\n5,v\n",
        {"header": False, "names": ["n", "s"]},
    ),
    "names-replace-header": (
        "a,b\n1,x\n2,y\n3,z\n",
        {"header": 0, "names": ["n", "s"]},
    ),
    "skip-blank-lines-false": (
        "a,b\n1,x\n\n2,y\n\n\n3,z\n4,w\n",
        {"skip_blank_lines": False},
    ),
    "blank-lines-before-header": ("\n\na,b\n1,x\n\n2,y\n3,z\n", {}),
    "bom-utf-8-sig": ("\ufeffa,b\n1,é\n2,ü\n3,ß\n4,ø\n", {"encoding": "utf-8-sig"}),
    "bom-default": ("\ufeffa,b\n1,é\n2,ü\n3,ß\n4,ø\n", {}),
    "quotechar": (
        "a,b\n1,'x,\ny'\n2,'it''s'\n3,z\n4,'w\n\n'\n",
        {"quotechar": "'"},
    ),
    "sep-semicolon": ('a;b\n1;"x;\ny"\n2;y\n3;z\n', {"sep": ";"}),
    "sep-tab": ('a\tb\n1\t"x\t\ny"\n2\ty\n3\tz\n', {"sep": "\t"}),
    "skiprows-comment-header-none": (
        "skip me\n# c\n1,x\n# c\n2,y\n3,z\n",
        {"skiprows": 1, "comment": "#", "header": False},
    ),
    "header-row-1": ("title\na,b\n1,x\n2,y\n3,z\n", {"header": 1}),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_pandas_options_match_the_whole_file_at_every_cut(
    tmp_path: Path, case: str
) -> None:
    text, kwargs = OPTION_CASES[case]
    path = tmp_path / f"{case}.csv"
    path.write_bytes(text.encode(kwargs.get("encoding", "utf-8").replace("-sig", "")))
    _every_cut(path, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"skipfooter": 1}, "skipfooter=1 needs the whole file"),
        ({"nrows": 5}, "nrows=5 needs the whole file"),
        ({"chunksize": 5}, "chunksize=5"),
        ({"skiprows": [0, 3]}, r"skiprows=\[0, 3\] \(a list or function\)"),
        ({"header": [0, 1]}, r"header=\[0, 1\] \(several header rows\)"),
    ],
)
def test_options_that_need_the_whole_file_are_refused(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    path = tmp_path / "a.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match=match):
        Dataset.Tabular.from_delimited_files(str(path), **kwargs)


@pytest.mark.parametrize(
    "text, kwargs, why",
    [
        ('a,b\n1,x"y\n2,"p\nq"\n3,z\n', {}, "quote inside an unquoted field"),
        ('a,b\n1,"x\\"\ny"\n2,z\n', {"escapechar": "\\"}, "escapechar"),
        ('a,b\n# it"s\n1,"x\ny"\n2,z\n', {"comment": "#"}, "comments"),
    ],
)
def test_files_that_cannot_be_cut_safely_are_read_whole_and_logged_once(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    text: str,
    kwargs: dict[str, Any],
    why: str,
) -> None:
    path = tmp_path / "odd.csv"
    path.write_text(text * 20)
    expected = pd.read_csv(path, **kwargs)
    with caplog.at_level(logging.WARNING, logger="daskrun"):
        for _ in range(2):
            n, got = _chunks(path, 8, **kwargs)
            assert n == 1
            _assert_same_rows(got, expected)
    told = [r.getMessage() for r in caplog.records if "read whole" in r.getMessage()]
    assert len(told) == 1 and why in told[0] and str(path) in told[0]


def test_utf16_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "u16.csv"
    path.write_bytes("a,b\n1,x\n2,y\n3,z\n".encode("utf-16"))
    n, got = _chunks(path, 4, encoding="utf-16")
    assert n == 1
    _assert_same_rows(got, pd.read_csv(path, encoding="utf-16"))


def _compress(kind: str, data: bytes, path: Path) -> None:
    if kind == "gz":
        path.write_bytes(gzip.compress(data))
    elif kind == "bz2":
        path.write_bytes(bz2.compress(data))
    elif kind == "xz":
        path.write_bytes(lzma.compress(data))
    elif kind == "zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("inner.csv", data)


# every row once in order, through real workers: quoted newlines cut at
# 1KB, CR-only endings, a skipped preamble, compressed files read whole
ROWS_SCRIPT = """
def init():
    pass

def run(mini_batch):
    return mini_batch
"""


def test_every_row_once_in_order_through_a_real_job(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    quoted = "id,text\n" + "".join(
        f'{i},"row {i}\nsecond line, with ""quotes"""\n' for i in range(3000)
    )
    (folder / "a-quoted.csv").write_text(quoted)
    (folder / "b-cr.csv").write_bytes(
        ("id,text\r" + "".join(f"{i},cr {i}\r" for i in range(3000))).encode()
    )
    plain = "id,text\n" + "".join(f"{i},packed {i}\n" for i in range(500))
    for kind in ("gz", "bz2", "zip", "xz", "zst"):
        _compress(kind, plain.encode(), folder / f"c.csv.{kind}")
    ds = Dataset.Tabular.from_delimited_files(str(folder))
    run = run_step(
        tmp_path,
        ROWS_SCRIPT,
        [ds],
        mini_batch_size="1KB",
        compute_target=cluster,
        output_format="csv",
    )
    assert run.status == "Completed", run.error
    assert run.items_failed == 0
    got = pd.read_csv(run.output_path or "", keep_default_na=False)
    expected = pd.concat(
        [pd.read_csv(p, keep_default_na=False) for p in ds.files()],
        ignore_index=True,
    )
    _assert_same_rows(got, expected)
    assert run.items_succeeded == len(expected) == 3000 + 3000 + 5 * 500
    # compressed files are one mini-batch each; the others were cut
    assert run.mini_batches_total > 5 + 2


# --- property: random valid CSVs, random cuts --------------------------------

_TEXT = st.text(alphabet='ab ,"\n\r', min_size=0, max_size=8)


@st.composite
def _csv_files(draw: st.DrawFn) -> tuple[bytes, bool]:
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    header = draw(st.booleans())
    rows = draw(
        st.lists(st.tuples(st.integers(-99, 10**6), _TEXT), min_size=1, max_size=25)
    )
    lines = ["n,text"] if header else []
    for number, text in rows:
        field = "x" + text  # never empty, never a number: one dtype per column
        if any(c in field for c in ',"\n\r'):
            field = '"' + field.replace('"', '""') + '"'
        lines.append(f"{number},{field}")
    body = newline.join(lines)
    if draw(st.booleans()):
        body += newline
    return body.encode(), header


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(_csv_files(), st.integers(1, 400))
def test_random_csvs_at_random_cuts_equal_pandas_whole_file(
    tmp_path: Path, csv: tuple[bytes, bool], size: int
) -> None:
    data, header = csv
    path = tmp_path / "random.csv"
    path.write_bytes(data)
    expected = pd.read_csv(path, **({} if header else {"header": None}))
    _, got = _chunks(path, size, header=header)
    _assert_same_rows(got, expected)
