"""The forecast: after the pilot (a tenth of the mini-batches left), the
progress line and the overview file tell the job's total wall time and
CPU-hours; job_result.txt keeps the one made at 10 % next to the actual."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import threading
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from daskrun.monitoring.forecast import PILOT_SHARE, Forecast
from daskrun.monitoring.monitor import REPORT

from .helpers import REPO, make_files, poison_files, start_daskrun, write_script
from .scripts import names_script

SLEEPY = names_script(0.1)  # 0.1 s per mini-batch

FORECAST = re.compile(r"forecast:? (\d+) s total, ([\d.e-]+) CPU-h")
DONE = re.compile(r"daskrun: (\d+)/(\d+) mini-batches")
OVERVIEW_DONE = re.compile(r"mini-batches: (\d+)/(\d+) done")


def _cli(tmp_path: Path, runs: Path, *args: str) -> subprocess.Popen[str]:
    return start_daskrun(
        *args,
        cwd=tmp_path,
        runs=runs,
        stdout=subprocess.DEVNULL,
        PYTHONPATH=str(REPO),
        DASK_DASKRUN__PROGRESS_INTERVAL="0.1",
    )


RUN = ["run", "score.py", "--input", "in", "--output", "out",
       "--mini-batch-size", "1", "--processes", "2"]  # fmt: skip


def _result(runs: Path) -> dict[str, str]:
    (path,) = runs.glob("*/logs/job_result.txt")
    return dict(line.split(": ", 1) for line in path.read_text().splitlines())


class _Overviews:
    """Every distinct job_progress_overview.txt seen while a job runs."""

    def __init__(self, runs: Path):
        self.runs, self.seen = runs, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            for path in self.runs.glob("*/logs/job_progress_overview.txt"):
                text = path.read_text()  # replaced atomically: never half
                if not self.seen or self.seen[-1] != text:
                    self.seen.append(text)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        return self.seen


def test_forecast_after_the_pilot_is_close_and_recorded(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "in", 60)
    write_script(tmp_path, SLEEPY)
    overviews = _Overviews(runs_dir)
    proc = _cli(tmp_path, runs_dir, *RUN)
    _, err = proc.communicate(timeout=300)
    seen = overviews.stop()
    assert proc.returncode == 0, err

    # the progress lines: a forecast only once 6 of 60 mini-batches are done
    pilot = math.ceil(PILOT_SHARE * 60)
    lines = [line for line in err.splitlines() if DONE.match(line)]
    assert any(FORECAST.search(line) for line in lines), err
    for line in lines:
        done = int(DONE.match(line).group(1))  # type: ignore[union-attr]
        if done < pilot:
            assert "forecast" not in line, err
    # the overview file, while it runs: the same
    running = [text for text in seen if "status: Running" in text]
    assert any(FORECAST.search(text) for text in running), seen
    assert all(text.count("forecast") == 1 for text in seen), seen
    for text in running:
        done = int(OVERVIEW_DONE.search(text).group(1))  # type: ignore[union-attr]
        if done < pilot:
            assert "forecast: - (pilot running)" in text, text

    result = _result(runs_dir)
    actual = float(result["seconds"])
    forecast = float(result["forecast_seconds_at_10pct"])
    assert abs(forecast / actual - 1) <= 0.25, result
    # once it ended, the overview gives the actual time beside the forecast
    (overview,) = runs_dir.glob("*/logs/job_progress_overview.txt")
    assert f"forecast: {forecast:.0f} s total, " in overview.read_text()
    assert f"(as the pilot ended); actual: {actual:.0f} s" in overview.read_text()
    assert re.match(
        r"\d+ mini-batches in [\d.]+ s of run phase on 2 ", result["forecast_basis"]
    ), result
    assert math.isclose(
        float(result["forecast_cpu_hours"]), 2 * forecast / 3600, rel_tol=0.01
    )
    # the actual cost: 2 worker processes for the job's wall time; run() slept
    # 60 × 0.1 s of it
    assert math.isclose(float(result["cpu_hours"]), 2 * actual / 3600, rel_tol=0.01)
    assert 6 / 3600 <= float(result["busy_cpu_hours"]) <= 2 * actual / 3600


def test_a_resumed_job_forecasts_the_rest(tmp_path: Path, runs_dir: Path) -> None:
    make_files(tmp_path / "in", 80)
    write_script(tmp_path, SLEEPY)
    proc = _cli(tmp_path, runs_dir, *RUN)
    assert proc.stderr is not None
    for line in proc.stderr:  # Ctrl-C once the first attempt forecast
        if FORECAST.search(line) and int(DONE.match(line).group(1)) >= 30:  # type: ignore[union-attr]
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    first = _result(runs_dir)
    (run_dir,) = runs_dir.glob("*/logs")
    report = (run_dir / REPORT).read_text().splitlines()
    rest = 80 - (len(report) - 1)
    assert 0 < rest <= 50, first

    again = _cli(tmp_path, runs_dir, "resume", run_dir.parent.name)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    result = _result(runs_dir)
    # the pilot is a tenth of what was left, and the forecast is of this
    # attempt: what it ran and had left are at most the rest (mini-batches
    # committed but not reported by the first are done, not run)
    ran, left = map(
        int,
        re.match(  # type: ignore[union-attr]
            r"(\d+) mini-batches in .* (\d+) left", result["forecast_basis"]
        ).groups(),
    )
    assert ran >= math.ceil(PILOT_SHARE * rest) and ran + left <= rest, result
    actual = float(result["seconds"])
    assert abs(float(result["forecast_seconds_at_10pct"]) / actual - 1) <= 0.25


# run() that takes 0.1 s a file and fails on a ...-poison one (after its time)
SLEEPY_POISON = """
import os, time

def init():
    pass

def run(mini_batch):
    time.sleep(0.1 * len(mini_batch))
    for p in mini_batch:
        if "poison" in os.path.basename(p):
            raise ValueError(f"cannot score {os.path.basename(p)}")
    return [os.path.basename(p) for p in mini_batch]
"""


def test_forecast_counts_retries_and_isolation(tmp_path: Path, runs_dir: Path) -> None:
    """Every mini-batch holds a failing file: each fails three tries, then
    its items are isolated (tried alone, three tries for the failing one).
    The forecast counts the time of all those tries, not the last one's."""
    poison_files(tmp_path / "in", 40, set(range(1, 40, 2)))
    write_script(tmp_path, SLEEPY_POISON)
    run = [*RUN[:-4], "--mini-batch-size", "2", "--processes", "2"]
    proc = _cli(tmp_path, runs_dir, *run, "--error-threshold", "-1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = _result(runs_dir)
    assert result["mini_batches_failed"] == "20" and result["items_failed"] == "20"
    actual = float(result["last_result_seconds"])
    forecast = float(result["forecast_seconds_at_10pct"])
    assert abs(forecast / actual - 1) <= 0.3, result
    # busy: every try of the 20 mini-batches (three of 0.2 s each, then
    # their items alone), not only the last tries' 20 × 0.1 s
    assert float(result["busy_cpu_hours"]) * 3600 >= 12, result


@given(
    slots=st.integers(1, 16),
    waves=st.integers(2, 200),
    extra=st.integers(0, 15),
    per_run=st.floats(0.001, 10),
    ready=st.floats(0, 100),
)
def test_forecast_of_an_even_run_is_its_time(
    slots: int, waves: int, extra: int, per_run: float, ready: float
) -> None:
    """On a run with no overhead, each mini-batch ``per_run`` seconds, the
    forecast at every wave's end is the job's time to its last result:
    start-up and the waves; none before the pilot is over."""
    total = waves * slots + extra % slots
    waves_needed = math.ceil(total / slots)
    actual = ready + waves_needed * per_run
    f = Forecast(started=0.0, slots=slots)
    f.begin(ready, 0, total)
    assert f.pilot >= max(math.ceil(PILOT_SHARE * total), slots)
    for wave in range(1, total // slots + 1):
        done = wave * slots
        at = ready + wave * per_run
        est = f.update(at, done, total, ran=done, busy=done * per_run)
        if done < f.pilot:
            assert est is None
            continue
        assert est is not None and est.unit == "CPU"
        if total % slots == 0:  # whole waves: exact
            assert math.isclose(est.seconds, actual, rel_tol=1e-9, abs_tol=1e-9)
        else:  # the last, partial wave is at least one run()
            assert actual - per_run <= est.seconds + 1e-9
            assert est.seconds <= actual + 1e-9
        assert math.isclose(est.hours, slots * est.seconds / 3600, rel_tol=1e-9)
    assert f.made is not None


def test_on_a_batch_queue_the_cost_is_node_hours() -> None:
    f = Forecast(started=0.0, slots=8, nodes=2)
    f.begin(10.0, 0, 10)
    est = f.update(11.0, 8, 10, ran=8, busy=8.0)
    assert est is not None and est.unit == "node"
    assert math.isclose(est.hours, 2 * est.seconds / 3600)
    lines = dict(line.split(": ", 1) for line in f.lines(3600.0, 7200.0))
    assert lines["node_hours"] == "2.000000"
    assert lines["busy_cpu_hours"] == "2.000000"
    assert "forecast_node_hours" in lines and "cpu_hours" not in lines
