"""Resources in plain view (logs/perf, job_result.txt, the memory warning,
the dashboard's plots) and the no-progress watchdog, on real workers."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import dask.config
import pytest
from distributed import LocalCluster
from hypothesis import given
from hypothesis import strategies as st

import daskrun
from daskrun import ConfigError, Dataset, ParallelRunConfig, StepRun
from daskrun.engine.config import config_seconds
from daskrun.monitoring.resources import PERF_COLUMNS, PerfLog, summarize

from .helpers import (
    chromium,
    files_step,
    job_page,
    job_plots,
    make_files,
    require_chromium,
    run_step,
    start_run,
    write_script,
)
from .scripts import SLOW_SCRIPT

MIB = 2**20
GPU_COLUMNS = [c for c in PERF_COLUMNS if c.startswith("gpu_")]


def _perf(logs_dir: str) -> dict[str, list[dict[str, str]]]:
    found = {}
    for path in sorted(Path(logs_dir, "perf").glob("*.csv")):
        with open(path, newline="") as f:
            found[path.stem] = list(csv.DictReader(f))
    return found


def _result(logs_dir: str) -> dict[str, str]:
    text = Path(logs_dir, "job_result.txt").read_text()
    return dict(line.split(": ", 1) for line in text.splitlines())


def test_perf_logs_have_every_worker_and_job_result_their_peaks(
    tmp_path: Path,
) -> None:
    make_files(tmp_path / "in", 12)
    settings = {"daskrun.resource-interval": 0.2, "daskrun.progress-timeout": 20}
    with dask.config.set(settings):  # a job that progresses is not stopped
        run = run_step(
            tmp_path,
            SLOW_SCRIPT,
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=1,
            process_count_per_node=2,
        )
    assert run.status == "Completed", run.error
    perf = _perf(run.logs_dir)
    assert sorted(perf) == ["worker-0", "worker-1"]
    result = _result(run.logs_dir)
    ran: set[str] = set()
    for agent, rows in perf.items():
        assert len(rows) >= 2, rows
        assert list(rows[0]) == list(PERF_COLUMNS)
        for row in rows:
            rss, limit = int(row["rss_bytes"]), int(row["memory_limit_bytes"])
            assert rss > 0
            assert limit == 0 or limit >= rss
            assert 0 <= float(row["cpu_percent"]) <= 100 * (os.cpu_count() or 1)
            assert all(row[c] == "" for c in GPU_COLUMNS)  # no NVML here
            ran.add(row["mini_batch"])
        # the job's figures are those of the samples
        peak = max(int(r["rss_bytes"]) for r in rows) / MIB
        assert float(result[f"peak_rss_mib.{agent}"]) == pytest.approx(peak, abs=0.06)
        cpu = [float(r["cpu_percent"]) for r in rows]
        mean = sum(cpu) / len(cpu)
        assert float(result[f"mean_cpu_percent.{agent}"]) == pytest.approx(
            mean, abs=0.1
        )
        assert not any(k.startswith("mean_gpu") for k in result)
    # rows name the mini-batch each worker ran
    assert ran - {""} <= {str(i) for i in range(12)} | {"init"}
    assert ran & {str(i) for i in range(12)}
    assert not Path(run.logs_dir, "perf", "warnings.txt").exists()


def test_gpu_columns_are_empty_when_nvml_is_unavailable(tmp_path: Path) -> None:
    """With NVML off (distributed.diagnostics.nvml: False, as where pynvml
    or a GPU is missing) the GPU columns stay empty and job_result.txt has
    no GPU lines; whatever this machine has."""
    make_files(tmp_path / "in", 4)
    settings = {"daskrun.resource-interval": 0.2, "distributed.diagnostics.nvml": False}
    with dask.config.set(settings):
        run = run_step(
            tmp_path,
            SLOW_SCRIPT,
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=1,
            process_count_per_node=1,
        )
    assert run.status == "Completed", run.error
    rows = _perf(run.logs_dir)["worker-0"]
    assert rows and all(row[c] == "" for row in rows for c in GPU_COLUMNS)
    assert not [k for k in _result(run.logs_dir) if "_gpu_" in k]
    assert "peak_rss_mib.worker-0" in _result(run.logs_dir)


def test_gpu_samples_fill_the_gpu_columns_and_job_result(tmp_path: Path) -> None:
    """What a worker with NVML sends (this machine may have no GPU): its
    GPU columns and job_result.txt lines."""
    said: list[str] = []
    log = PerfLog(tmp_path / "perf", said.append)
    for t, (gpu, used) in enumerate([(40.0, 3 * MIB), (60.0, 5 * MIB)]):
        sample = {
            "agent": "worker-0-gpu0",
            "time": 1.7e9 + t,
            "index": 2,
            "limit": 0,
            "cpu": 50.0,
            "rss": 80 * MIB,
            "gpu": gpu,
            "gpu_memory": used,
            "gpu_memory_total": 16 * MIB,
        }
        log.add((0.0, sample))
    log.close()
    rows = _perf(str(tmp_path))["worker-0-gpu0"]
    assert [r["gpu_utilization_percent"] for r in rows] == ["40.0", "60.0"]
    assert [r["gpu_memory_used_bytes"] for r in rows] == [str(3 * MIB), str(5 * MIB)]
    assert {r["gpu_memory_total_bytes"] for r in rows} == {str(16 * MIB)}
    assert log.lines() == [
        "peak_rss_mib.worker-0-gpu0: 80.0",
        "mean_cpu_percent.worker-0-gpu0: 50.0",
        "mean_gpu_percent.worker-0-gpu0: 50.0",
        "peak_gpu_memory_mib.worker-0-gpu0: 5.0",
    ]
    assert said == []  # no memory limit: nothing to warn about


readings = st.lists(st.floats(0, 1e4, allow_nan=False), max_size=20)


@given(readings, readings, st.lists(st.one_of(st.none(), st.floats(0, 100))))
def test_a_sample_sums_up_the_monitor_readings(
    cpu: list[float], memory: list[float], gpu: list[float | None]
) -> None:
    got = summarize(
        {"cpu": cpu, "memory": memory, "gpu_utilization": gpu, "gpu_memory_used": gpu}
    )
    measured = [g for g in gpu if g is not None]
    assert got["cpu"] == (pytest.approx(sum(cpu) / len(cpu)) if cpu else None)
    assert got["rss"] == (max(memory) if memory else None)
    expected_gpu = sum(measured) / len(measured) if measured else None
    assert got["gpu"] == (pytest.approx(expected_gpu) if measured else None)
    assert got["gpu_memory"] == (max(measured) if measured else None)


@given(st.floats(1e-3, 1e7, allow_nan=False))
def test_seconds_settings_read_numbers_and_durations(seconds: float) -> None:
    with dask.config.set({"daskrun.progress-timeout": seconds}):
        assert config_seconds("progress-timeout") == seconds
    with dask.config.set({"daskrun.progress-timeout": f"{seconds:.3f}s"}):
        assert config_seconds("progress-timeout") == pytest.approx(
            float(f"{seconds:.3f}")
        )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("progress-timeout", "soon"),
        ("first-result-timeout", -1),
        ("resource-interval", 0),
    ],
)
def test_a_bad_setting_is_refused_before_any_worker_starts(
    tmp_path: Path, key: str, value: Any
) -> None:
    make_files(tmp_path / "in", 2)
    with (
        dask.config.set({f"daskrun.{key}": value}),
        pytest.raises(ConfigError) as caught,
    ):
        run_step(tmp_path, SLOW_SCRIPT, Dataset.File.from_files(str(tmp_path / "in")))
    message = str(caught.value)
    assert f"daskrun.{key}={value!r}" in message
    assert f'dask.config.set({{"daskrun.{key}": 600}})' in message
    assert not list(Path(tmp_path, "runs").glob("*/logs"))  # nothing ran


HOG_SCRIPT = """
import os, time

import psutil
from distributed import get_worker

def init():
    pass

def run(mini_batch):
    if os.path.basename(mini_batch[0]).startswith("big"):
        # up to 87% of the worker's limit: past the warning (80%), short of
        # distributed's restart (95%)
        limit = get_worker().memory_manager.memory_limit
        process, hog = psutil.Process(), []
        while process.memory_info().rss < 0.87 * limit:
            hog.append(b"x" * 2**22)
        time.sleep(2.0)  # several samples see it
        del hog
    return [os.path.basename(p) for p in mini_batch]
"""


def test_a_worker_near_its_memory_limit_is_warned_about_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_files(tmp_path / "in", 1, prefix="big")
    make_files(tmp_path / "in", 4, prefix="ok")
    settings = {
        "daskrun.resource-interval": 0.2,
        "daskrun.local-cluster.memory-limit": "300MiB",
        # one worker holds the big file: a speculative copy on the other
        # worker would be near its limit too, and warned about on its own
        "daskrun.runner.speculate": False,
    }
    with dask.config.set(settings):
        run = run_step(
            tmp_path,
            HOG_SCRIPT,
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=1,
            process_count_per_node=2,
            show_output=True,
        )
    assert run.status == "Completed", run.error
    lines = Path(run.output_path or "").read_text().splitlines()
    assert lines == ["big00000.txt", *(f"ok{i:05d}.txt" for i in range(4))]
    warned = Path(run.logs_dir, "perf", "warnings.txt").read_text().splitlines()
    assert len(warned) == 1, warned
    assert re.match(
        r"daskrun: (worker-\d) uses \d+% of its memory limit \(RSS \d+ MiB of "
        r"300 MiB\) while running mini-batch 0 \(files big00000\.txt\)",
        warned[0],
    ), warned[0]
    agent = warned[0].split()[1]
    # the samples show it: over 80% of the limit from mini-batch 0 on (the
    # allocator may keep what run() freed)
    over = [
        row
        for row in _perf(run.logs_dir)[agent]
        if int(row["rss_bytes"]) > 0.8 * int(row["memory_limit_bytes"])
    ]
    assert len(over) >= 2 and over[0]["mini_batch"] == "0"
    assert float(_result(run.logs_dir)[f"peak_rss_mib.{agent}"]) > 0.8 * 300
    terminal = capsys.readouterr().err
    assert terminal.count("of its memory limit") == 1
    assert warned[0] in terminal


def test_the_dashboard_plots_each_workers_resources(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    require_chromium()
    make_files(tmp_path / "in", 60)
    script = write_script(tmp_path, SLOW_SCRIPT)
    config = ParallelRunConfig(str(script), mini_batch_size=1, compute_target=cluster)
    with dask.config.set({"daskrun.resource-interval": 0.2}):
        job, runs = start_run(files_step(tmp_path, "resource-step", config))
    page, plots = job_page(cluster)
    data = job_plots(  # the page shows this job, with samples of both workers
        plots,
        "resource-step_",
        lambda data: all(
            f"worker-{i}" in json.dumps(data.get("memory")) for i in (0, 1)
        ),
        what="resource plots of both workers",
    )
    assert "cpu" in data and "gpu" not in data  # no GPU measured here
    dom = chromium("--dump-dom", page)
    assert dom.returncode == 0, dom.stderr
    assert 'id="memory" data-rendered="1"' in dom.stdout
    assert 'id="cpu" data-rendered="1"' in dom.stdout
    assert "Memory per worker" in json.dumps(data["memory"])
    shot = tmp_path / "resources.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1150,1180", page)
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr
    if os.environ.get("DASKRUN_RESOURCES_SCREENSHOT"):
        shutil.copy(shot, os.environ["DASKRUN_RESOURCES_SCREENSHOT"])
    job.join(120)
    assert runs and runs[0].status == "Completed", runs and runs[0].error


def _blocking_script(blocker: Path, only: str | None) -> str:
    """run() waits for ``blocker`` to exist: for the file named ``only``, or
    for every file; a deadlock, as far as the job can tell."""
    test = f"os.path.basename(mini_batch[0]) == {only!r}" if only else "True"
    return f"""
import os, time

def init():
    pass

def run(mini_batch):
    if {test}:
        while not os.path.exists({str(blocker)!r}):
            time.sleep(0.05)
    time.sleep(0.1)
    return [os.path.basename(p) for p in mini_batch]
"""


def _stalled_then_resumed(
    tmp_path: Path, settings: dict[str, Any], only: str | None
) -> tuple[StepRun, dict[str, str], StepRun]:
    """The stalled run, its job_result.txt, and its resume once released."""
    make_files(tmp_path / "in", 6)
    blocker = tmp_path / "released"
    with dask.config.set(settings):
        run = run_step(
            tmp_path,
            _blocking_script(blocker, only),
            Dataset.File.from_files(str(tmp_path / "in")),
            mini_batch_size=1,
            process_count_per_node=2,
            run_invocation_timeout=3600,
            show_output=True,
        )
    result = _result(run.logs_dir)
    blocker.touch()
    resumed = daskrun.resume(run.run_id)
    return run, result, resumed


def test_a_job_that_stops_progressing_is_canceled_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the stall is one worker's: a speculative copy of mini-batch 3 would
    # stall the other worker too (and be named in the message as its holder)
    run, result, resumed = _stalled_then_resumed(
        tmp_path,
        {"daskrun.progress-timeout": 3, "daskrun.runner.speculate": False},
        only="f00003.txt",
    )
    assert run.status == "Canceled"
    assert re.fullmatch(
        r"no mini-batch finished for 3 s \(daskrun\.progress-timeout=3\) while 2 "
        r"workers are alive: worker-\d holds mini-batch 3 \(files f00003\.txt\); "
        r"those workers were restarted",
        run.error or "",
    ), run.error
    terminal = capsys.readouterr().err
    assert f"daskrun: {run.error}" in terminal
    assert f"resume with: daskrun resume {run.run_id}" in terminal
    assert result["status"] == "Canceled" and result["error"] == run.error
    assert result["items_succeeded"] == "5"  # the others finished before
    assert resumed.status == "Completed", resumed.error
    lines = Path(resumed.output_path or "").read_text().splitlines()
    assert lines == [f"f{i:05d}.txt" for i in range(6)]  # a clean run's


def test_no_first_result_in_time_cancels_the_job(tmp_path: Path) -> None:
    run, result, resumed = _stalled_then_resumed(
        tmp_path, {"daskrun.first-result-timeout": 3}, only=None
    )
    assert run.status == "Canceled"
    error = run.error or ""
    assert error.startswith(
        "no mini-batch finished within 3 s of init() "
        "(daskrun.first-result-timeout=3) while 2 workers are alive: "
    ), error
    held = re.findall(r"(worker-\d) holds mini-batch \d \(files f0000\d\.txt\)", error)
    assert sorted(held) == ["worker-0", "worker-1"], error
    assert result["status"] == "Canceled" and result["items_succeeded"] == "0"
    assert resumed.status == "Completed", resumed.error
    lines = Path(resumed.output_path or "").read_text().splitlines()
    assert lines == [f"f{i:05d}.txt" for i in range(6)]


@pytest.mark.parametrize("threshold", [None, 65536])
def test_own_workers_keep_glibcs_malloc_tuning_unless_a_threshold_is_set(
    threshold: int | None,
) -> None:
    """distributed sets MALLOC_TRIM_THRESHOLD_ for every Nanny's worker,
    which stops glibc's adaptive mmap threshold (large arrays mapped and
    unmapped per mini-batch); daskrun's own workers go without it unless
    daskrun.local-cluster.malloc-trim-threshold sets one."""
    from daskrun.backends.compute.local import local_cluster

    before = os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # a Nanny leaves it
    try:
        with (
            dask.config.set({"daskrun.local-cluster.malloc-trim-threshold": threshold}),
            local_cluster(1) as client,
        ):
            seen = client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_")
            threads = client.run(os.environ.get, "OMP_NUM_THREADS")
    finally:
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        if before is not None:
            os.environ["MALLOC_TRIM_THRESHOLD_"] = before
    assert list(seen.values()) == [None if threshold is None else str(threshold)]
    assert list(threads.values()) == ["1"]  # distributed's other settings stay


def test_a_bad_malloc_trim_threshold_fails_before_any_worker_starts() -> None:
    from daskrun.backends.compute.local import local_cluster

    with (
        dask.config.set({"daskrun.local-cluster.malloc-trim-threshold": "lots"}),
        pytest.raises(ConfigError, match=r"malloc-trim-threshold='lots'.*65536"),
        local_cluster(1),
    ):
        pass
