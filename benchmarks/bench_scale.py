"""Scale, simulated on one machine (issue 29, target 4).

A no-op entry script over N tiny files, run by the ``daskrun`` command as a
user types it, against a scheduler and worker processes started apart (as
on a real cluster), so each one's CPU can be told apart::

    dask scheduler  ──  dask worker --nworkers P --nthreads 1
          ▲
    daskrun run noop.py --input FOLDER --scheduler ADDR --mini-batch-size B

Prints and saves (``benchmarks/results/scale-<N>.json``):

- the seconds from the command's start to the first ``run()`` (on a
  worker), to the first result (``job_result.txt``) and to its exit;
- the client's and the scheduler's CPU seconds per mini-batch, and the
  workers' (all P processes together);
- the client's peak RSS;
- what that means for a cluster of ``--nodes`` nodes (100): the
  mini-batches per second one scheduler takes at the measured CPU per
  mini-batch, and the shortest mini-batch that keeps daskrun's overhead
  under 1 % (both the scheduler's rate and the workers' own per-batch cost).

The files (``{i:07d}.txt``, one byte each) are made once under ``.cache/``
and kept; ``--links`` makes hard links instead, 60,000 to each file (no
inode per path: how 10,000,000 paths fit on a small disk). Usage::

    python benchmarks/bench_scale.py                       # 1,000,000 files
    python benchmarks/bench_scale.py -n 10000000 --links --mbs 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from bench_client import NOOP

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE.parent / ".cache"

DASK = [sys.executable, "-m", "dask"]

# run() notes when it first ran (bench_client's no-op, by its variable)
FIRST_VAR = "BENCH_CLIENT_FIRST"


LINKS_PER_SOURCE = 60_000


def make_inputs(n: int, links: bool) -> Path:
    """N one-byte files (or N hard links to one), made once and kept."""
    data = CACHE / (f"bench-scale-links-{n}" if links else f"bench-core-{n}")
    if data.is_dir():
        return data
    tmp = data.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if links:  # ext4 allows 65,000 links to one file: a source per 60,000
        sources = tmp.with_suffix(".sources")
        sources.mkdir(exist_ok=True)
        for i in range(n):
            source = sources / f"{i // LINKS_PER_SOURCE}.txt"
            if i % LINKS_PER_SOURCE == 0:
                source.write_bytes(b"x")
            os.link(source, tmp / f"{i:08d}.txt")
    else:
        for i in range(n):
            (tmp / f"{i:07d}.txt").write_bytes(b"x")
    tmp.rename(data)
    print(f"made {n:,} inputs in {time.perf_counter() - start:.0f} s", flush=True)
    return data


def _cpu(proc: psutil.Process, tree: bool = False) -> float:
    """User + system CPU seconds of ``proc`` (and, with ``tree``, of every
    process beneath it)."""
    procs = [proc, *proc.children(recursive=True)] if tree else [proc]
    total = 0.0
    for p in procs:
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.1)


def _workers_up(address: str, count: int) -> None:
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(count, timeout=120)


def measure(data: Path, n: int, mbs: int, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = dict(
            os.environ,
            **{FIRST_VAR: str(tmp / "first")},
            DASK_DASKRUN__RUNS_DIR=str(tmp / "runs"),  # not ~/.daskrun/runs
        )
        (tmp / "noop.py").write_text(NOOP)
        sched = subprocess.Popen(
            [*DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", ":0", "--scheduler-file", str(tmp / "s.json")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        workers = None
        try:
            _wait_for(tmp / "s.json", sched, "the scheduler")
            address = json.loads((tmp / "s.json").read_text())["address"]
            workers = subprocess.Popen(
                [*DASK, "worker", address, "--nworkers", str(processes),
                 "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            )  # fmt: skip
            _workers_up(address, processes)
            return _client(tmp, env, data, address, mbs, sched, workers) | {
                "n": n,
                "mini_batch_size": mbs,
                "processes": processes,
            }
        finally:
            for proc in (workers, sched):
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)


def _client(
    tmp: Path,
    env: dict[str, str],
    data: Path,
    address: str,
    mbs: int,
    sched: subprocess.Popen[bytes],
    workers: subprocess.Popen[bytes],
) -> dict:
    sched_proc, workers_proc = psutil.Process(sched.pid), psutil.Process(workers.pid)
    sched_before, workers_before = _cpu(sched_proc), _cpu(workers_proc, tree=True)
    start_wall = time.time()
    start = time.perf_counter()
    client = subprocess.Popen(
        [sys.executable, "-m", "daskrun", "run", str(tmp / "noop.py"),
         "--input", str(data), "--output", str(tmp / "out"),
         "--mini-batch-size", str(mbs), "--scheduler", address, "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp,
    )  # fmt: skip
    # the scheduler's and workers' CPU is read while they still run
    peak_sched = peak_workers = 0.0
    while client.poll() is None:
        peak_sched = _cpu(sched_proc)
        peak_workers = _cpu(workers_proc, tree=True)
        time.sleep(0.2)
    wall = time.perf_counter() - start
    out, err = client.communicate()
    if client.returncode != 0:
        raise RuntimeError(err.decode()[-3000:])
    first_run = float((tmp / "first").read_text()) - start_wall
    job = _job_result(tmp)
    batches = int(job["mini_batches_total"]) if "mini_batches_total" in job else None
    return {
        "to_first_run_s": round(first_run, 2),
        "total_s": round(wall, 2),
        "job": job,
        "client_cpu_s": round(_children_cpu(), 2),
        "client_peak_rss_mb": round(_children_rss_mb(), 1),
        "scheduler_cpu_s": round(peak_sched - sched_before, 2),
        "workers_cpu_s": round(peak_workers - workers_before, 2),
        "mini_batches": batches,
    }


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _children_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _job_result(workspace: Path) -> dict:
    """The job's own timings: ``job_result.txt``'s ``key: value`` lines."""
    found = sorted(workspace.rglob("job_result.txt"))
    if not found:
        return {}
    result = {}
    for line in found[-1].read_text().splitlines():
        key, sep, value = line.rpartition(": ")
        if sep:
            result[key.strip()] = value.strip()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="inputs (1,000,000)")
    parser.add_argument("--mbs", type=int, default=10, help="mini_batch_size (10)")
    parser.add_argument("--processes", type=int, default=8, help="workers (8)")
    parser.add_argument("--links", action="store_true", help="hard links to one file")
    parser.add_argument("--nodes", type=int, default=100, help="nodes to project to")
    parser.add_argument("--per-node", type=int, default=8, help="processes a node")
    parser.add_argument("--out", help="file name in benchmarks/results/")
    args = parser.parse_args()

    data = make_inputs(args.n, args.links)
    row = measure(data, args.n, args.mbs, args.processes)
    batches = row["mini_batches"] or -(-args.n // args.mbs)
    row["mini_batches"] = batches
    per = {
        key.removesuffix("_s"): round(1000 * row[key] / batches, 3)
        for key in ("client_cpu_s", "scheduler_cpu_s", "workers_cpu_s")
    }
    row["ms_cpu_per_mini_batch"] = per
    processes = args.nodes * args.per_node
    # one scheduler and one client take every process's mini-batches, in
    # series; each worker process pays its own per-batch cost
    sched_rate = 1000 / per["scheduler_cpu"] if per["scheduler_cpu"] else None
    client_rate = 1000 / per["client_cpu"] if per["client_cpu"] else None
    rates = [r for r in (sched_rate, client_rate) if r]
    row["projection"] = {
        "nodes": args.nodes,
        "processes": processes,
        "scheduler_mini_batches_per_s": round(sched_rate) if sched_rate else None,
        "client_mini_batches_per_s": round(client_rate) if client_rate else None,
        # every process busy: the slower of the two must take processes/T a second
        "shortest_mini_batch_s_client_and_scheduler_keep_up": round(
            processes / min(rates), 3
        )
        if rates
        else None,
        "shortest_mini_batch_s_for_1pct_worker_overhead": round(
            per["workers_cpu"] / 1000 * 100, 3
        ),
    }
    row["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps(row, indent=1))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (args.out or f"scale-{args.n}{'-links' if args.links else ''}.json")
    out.write_text(json.dumps(row, indent=1) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
