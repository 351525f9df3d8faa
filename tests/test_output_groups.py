"""Group files: the cheap mini-batches of one task have their rows written
together, and the output takes each mini-batch's rows once, in index order,
whether they lie in a part of its own, in one group or in several."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import daskrun
from daskrun import Dataset
from daskrun.engine.output import (
    OutputTarget,
    Parts,
    assemble,
    format_rows,
    prepare_parts,
    write_group,
    write_part,
)

from .helpers import committed, make_files, run_step

# one mini-batch: its rows, and how they are written
batch = st.fixed_dictionaries(
    {
        "rows": st.lists(st.integers(-(10**6), 10**6), max_size=5),
        # its own part, a group, or two groups (a task rerun after its
        # result was lost writes it again)
        "how": st.sampled_from(["own", "group", "twice"]),
        # its items isolated in the end: pieces, and a whole copy a lost
        # task's group kept, which must not be taken
        "isolated": st.booleans(),
        # a piece written whose worker then died (killed by another task)
        # before it reported: it was halved again, and its halves written
        "resplit": st.booleans(),
    }
)


def _frame(rows: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"id": rows, "score": [r / 7 for r in rows]})


def _write(target: OutputTarget, batches: list[dict], fmt: str, cut: int) -> set[int]:
    """Write the batches' rows as drawn; the indices isolated."""
    isolated = set()
    groups: list[list[tuple[int, bytes]]] = [[], []]
    for index, b in enumerate(batches):
        data, _ = format_rows(_frame(b["rows"]), fmt)
        if b["isolated"] and len(b["rows"]) > 1:
            isolated.add(index)
            # the items that succeeded in isolation: its first and its rest
            pieces = [((0, 1), b["rows"][:1]), ((1, 99), b["rows"][1:])]
            if b["resplit"]:
                pieces += [((1, 2), b["rows"][1:2]), ((2, 99), b["rows"][2:])]
            for span, rows in pieces:
                write_part(target, index, format_rows(_frame(rows), fmt)[0], span)
            stale, _ = format_rows(_frame([999_999_999]), fmt)
            groups[index % 2].append((index, stale))
        elif b["how"] == "own":
            write_part(target, index, data)
        else:
            groups[index % 2].append((index, data))
            if b["how"] == "twice":
                groups[1 - index % 2].append((index, data))
    for group in groups:
        for start in range(0, len(group), cut):  # several groups of one task
            if group[start : start + cut]:
                write_group(target, group[start : start + cut])
    return isolated


@pytest.mark.parametrize("fmt", ["text", "csv", "parquet"])
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batches=st.lists(batch, min_size=1, max_size=12), cut=st.integers(1, 4))
def test_the_output_takes_each_mini_batch_once_in_order(
    tmp_path: Path, fmt: str, batches: list[dict], cut: int
) -> None:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    target = OutputTarget(str(out), "result", "run1", output_format=fmt)
    prepare_parts(target)
    isolated = _write(target, batches, fmt, cut)
    found = Parts(target)
    assert set(range(len(batches))) - isolated <= found.whole
    succeeded = [i not in isolated for i in range(len(batches))]
    final = assemble(target, succeeded)

    expected = [r for b in batches for r in b["rows"]]
    data = Path(final).read_bytes()
    if fmt == "text":
        got = pd.read_csv(io.BytesIO(data), sep=" ", header=None, names=["id", "score"])
    elif fmt == "csv":
        got = pd.read_csv(io.BytesIO(data)) if data else _frame([])
    else:
        got = pd.read_parquet(io.BytesIO(data))
    assert list(got["id"]) == expected


FAST = "def init():\n    pass\n\ndef run(mini_batch):\n    return mini_batch\n"


def test_a_task_of_cheap_mini_batches_writes_one_group(
    tmp_path: Path, runs_dir: Path
) -> None:
    names = make_files(tmp_path / "in", 300)
    # a failed job keeps its parts: what the tasks wrote is there to count
    script = FAST.replace(
        "return mini_batch",
        "fixed = os.path.join(os.path.dirname(mini_batch[0]), '..', 'fixed')\n"
        "    if 'f00150' in mini_batch[0] and not os.path.exists(fixed):\n"
        "        raise ValueError('bad file')\n"
        "    return mini_batch",
    )
    script = "import os\n" + script
    run = run_step(
        tmp_path,
        script,
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1,
        error_threshold=0,
        run_max_try=1,
    )
    assert run.status == "Failed"
    out = tmp_path / "out"
    parts = list(out.glob(".daskrun/*/parts/*.part"))
    groups = list(out.glob(".daskrun/*/parts/*.group"))
    written = committed(out)
    assert 150 not in written
    # far fewer files than mini-batches: the tasks carried several each
    assert groups and len(parts) + len(groups) < len(written) / 4
    # resumed once fixed: every file once, in order
    (tmp_path / "fixed").touch()
    again = daskrun.resume(run.run_id, retry_failed=True, show_output=False)
    assert again.status == "Completed", again.error
    lines = Path(again.output_path or "").read_text().splitlines()
    assert lines == [str(p) for p in names]


def test_removing_changed_mini_batches_takes_their_groups_along(
    tmp_path: Path,
) -> None:
    target = OutputTarget(str(tmp_path / "out"), "result", "run1")
    prepare_parts(target)
    write_part(target, 0, b"0\n")
    write_part(target, 1, b"1a\n", (0, 1))  # a piece of an isolated one
    write_part(target, 1, b"1b\n", (2, 3))
    write_group(target, [(2, b"2\n"), (3, b"3\n")])
    write_group(target, [(4, b"4\n"), (5, b"5\n")])
    write_part(target, 6, b"6\n")
    left = Parts(target).remove({0, 1, 3})
    # 2 went with 3's group: it runs again as well
    assert left.whole == {4, 5, 6} and not left.pieces
    assert Parts(target).whole == {4, 5, 6}
    assert left.open(5).read() == b"5\n"
