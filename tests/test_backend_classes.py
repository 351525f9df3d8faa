"""Output formats and compute targets are classes registered by ``kind``
(as datastores' storage back ends): each answers its own contract, and a
new one is one new class."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from daskrun import AmlCompute, ComputeTarget, LocalCompute, RemoteCompute, Workspace
from daskrun.backends.compute.mpi import MpiRanks
from daskrun.backends.compute.queues import PbsJobs, SgeJobs
from daskrun.backends.compute.targets import (
    TARGETS,
    AmlProvisioned,
    ComputeBackend,
    GatewayClusters,
    LocalProcesses,
    SchedulerAddress,
    SlurmJobs,
    compute_backend,
)
from daskrun.backends.outputs import (
    FORMATS,
    CsvRows,
    OutputFormat,
    ParquetTable,
    TextLines,
    output_format_for,
)
from daskrun.engine.output import OutputTarget
from daskrun.exceptions import ConfigError, OutputError


def test_formats_are_registered_in_their_order() -> None:
    assert list(FORMATS) == ["text", "csv", "parquet"]
    assert FORMATS["text"] is TextLines
    assert FORMATS["csv"] is CsvRows and FORMATS["parquet"] is ParquetTable
    assert OutputTarget("out", "o.csv", "r", output_format="csv").format.kind == "csv"
    with pytest.raises(ConfigError, match="'text', 'csv', 'parquet'"):
        output_format_for("xlsx")


@pytest.mark.parametrize("kind", ["text", "csv", "parquet"])
def test_each_format_encodes_counts_and_concatenates(kind: str) -> None:
    fmt = output_format_for(kind)
    first, n1 = fmt.encode(pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}))
    second, n2 = fmt.encode(pd.DataFrame({"a": [3], "b": ["z"]}))
    assert (n1, n2) == (2, 1)
    assert fmt.count(io.BytesIO(first)) == 2 and fmt.count(io.BytesIO(second)) == 1
    out = io.BytesIO()
    fmt.concat(
        [(0, lambda: io.BytesIO(first)), (1, lambda: io.BytesIO(second))],
        out,
        lambda i: f"mini-batch {i}",
    )
    assert fmt.count(io.BytesIO(out.getvalue())) == 3


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_tables_of_other_columns_are_refused_naming_both(kind: str) -> None:
    fmt = output_format_for(kind)
    first, _ = fmt.encode(pd.DataFrame({"a": [1]}))
    other, _ = fmt.encode(pd.DataFrame({"b": [1]}))
    with pytest.raises(OutputError, match=f"mini-batch 1 .* output_format='{kind}'"):
        fmt.concat(
            [(0, lambda: io.BytesIO(first)), (1, lambda: io.BytesIO(other))],
            io.BytesIO(),
            lambda i: f"mini-batch {i}",
        )


def test_each_format_reads_back(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1, 2]})
    for kind in ("csv", "parquet"):
        fmt = output_format_for(kind)
        path = tmp_path / f"out.{kind}"
        path.write_bytes(fmt.encode(frame)[0])
        assert fmt.tabular
        assert fmt.read_frame(str(path), {}).compute()["a"].tolist() == [1, 2]
        assert fmt.read_bag(str(path), {}).compute() == [{"a": 1}, {"a": 2}]
    text = output_format_for("text")
    (tmp_path / "out.txt").write_bytes(text.encode(["x", "y"])[0])
    assert not text.tabular
    assert text.read_bag(str(tmp_path / "out.txt"), {}).compute() == ["x", "y"]


def test_a_new_format_is_one_class() -> None:
    class Lines(OutputFormat):
        kind = "test-lines"

        def encode(self, result: Any) -> tuple[bytes, int]:
            return "".join(f"{x}\n" for x in result).encode(), len(result)

        def count(self, part: Any) -> int:
            return sum(1 for _ in part)

        def concat(self, parts: Any, out: Any, name: Any) -> None:
            for _, open_part in parts:
                out.write(open_part().read())

        def read_frame(self, path: str, options: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    try:
        target = OutputTarget("out", "o", "r", output_format="test-lines")
        assert isinstance(target.format, Lines)
        assert target.format.encode([1, 2]) == (b"1\n2\n", 2)
    finally:
        del FORMATS["test-lines"]


def test_compute_targets_are_registered_classes() -> None:
    assert TARGETS == {
        "local": LocalProcesses,
        "aml": AmlProvisioned,
        "scheduler": SchedulerAddress,
        "slurm": SlurmJobs,
        "gateway": GatewayClusters,
        "pbs": PbsJobs,
        "sge": SgeJobs,
        "mpi": MpiRanks,
    }
    assert PbsJobs.queued and SgeJobs.queued and not MpiRanks.queued
    assert SlurmJobs.queued and not LocalProcesses.queued
    assert LocalProcesses.runs_here and AmlProvisioned.runs_here
    assert not SchedulerAddress.runs_here and not SlurmJobs.runs_here
    assert not GatewayClusters.queued and not GatewayClusters.runs_here
    with pytest.raises(ConfigError, match="kind 'k8s'.*known: aml, gateway, local"):
        compute_backend("k8s", "big", {})


def test_registered_targets_map_onto_the_classes(tmp_path: Path) -> None:
    ws = Workspace.create(str(tmp_path / "ws"))
    local = ComputeTarget.create(ws, "cpu", LocalCompute.provisioning_configuration())
    remote = ComputeTarget.create(
        ws, "far", RemoteCompute.attach_configuration("tcp://10.0.0.5:8786")
    )
    aml = ComputeTarget.create(
        ws, "aml", AmlCompute.provisioning_configuration(max_nodes=2)
    )
    assert type(local.backend) is LocalProcesses and local.runs_here
    assert type(remote.backend) is SchedulerAddress and not remote.runs_here
    assert type(aml) is AmlCompute and type(aml.backend) is AmlProvisioned
    assert not any(t.queued for t in (local, remote, aml))
    with pytest.raises(ConfigError, match="node_count=3 is more than max_nodes=2"):
        with aml.connect(3, 1):
            pass


def test_a_new_compute_target_is_one_class() -> None:
    class Borrowed(ComputeBackend):
        kind = "test-borrowed"
        queued = True

        @contextlib.contextmanager
        def connect(
            self,
            node_count: int,
            process_count_per_node: int | None,
            on_lost: Any = None,
            log_file: Any = None,
        ) -> Iterator[Any]:
            yield f"{self.options['pool']}:{node_count}"

    try:
        found = compute_backend("test-borrowed", "b", {"pool": "p"})
        assert found.queued
        with found.connect(2, None) as client:
            assert client == "p:2"
    finally:
        del TARGETS["test-borrowed"]
