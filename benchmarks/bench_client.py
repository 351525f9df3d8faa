"""The client's serial work per input (issue 29, target 1).

Builds N empty files in a folder under ``.cache/`` (once; reused after) and
runs a daskrun step with a no-op ``run()`` over them, given as a list of
paths and as the folder, each in a fresh process profiled with cProfile
(``--no-profile``: timed only, as cProfile slows per-input work several-fold).
Prints, for each, the seconds from the call to the first ``run()`` (on a
worker) and overall, those seconds per input in µs, the job's own timings
(job_result.txt) and the top cumulative entries of the client's profile;
saves it all as JSON in ``benchmarks/results/``.

Usage::

    python benchmarks/bench_client.py                  # N = 200,000
    python benchmarks/bench_client.py -n 20000 --pythonpath /work/base \\
        --out client-20000-before.json                 # an earlier daskrun
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE.parent / ".cache" / "bench-client"

# run() notes when it first ran (one file, created once by whichever
# worker gets there first), then does nothing
NOOP = """\
import os, time

FIRST = os.environ["BENCH_CLIENT_FIRST"]


def init():
    pass


def run(mini_batch):
    try:
        fd = os.open(FIRST, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return mini_batch
    os.write(fd, repr(time.time()).encode())
    os.close(fd)
    return mini_batch
"""


# the client's per-input work that issue 29 measured (old and new names)
WATCHED = {
    "from_files",
    "expand_paths",
    "stamps",
    "_fill_ledger",
    "_not_source",
    "build_bundle",
    "_new_record",
    "_input_specs",
    "save",
    "plan",
}


def make_files(n: int) -> Path:
    """A folder of ``n`` empty files, made once and kept for later runs."""
    folder = CACHE / f"files-{n}"
    done = folder.with_suffix(".done")
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        open(folder / f"{i:07d}.png", "wb").close()
    done.touch()
    return folder


def child(data: Path, as_list: bool, mbs: int, top: int, profiled: bool) -> dict:
    """One step over ``data`` in this process, profiled if ``profiled``."""
    import dask.config

    from daskrun import Dataset, ParallelRunConfig, ParallelRunStep

    work = Path(tempfile.mkdtemp(dir=CACHE, prefix="work-"))
    script = work / "script.py"
    script.write_text(NOOP)
    first = work / "first-run"
    os.environ["BENCH_CLIENT_FIRST"] = str(first)
    profile = cProfile.Profile()
    with dask.config.set({"daskrun.runs-dir": str(work / "runs")}):
        # the caller's own list: made before the clock starts
        given = sorted(str(p) for p in data.iterdir()) if as_list else str(data)
        start_wall = time.time()
        start = time.perf_counter()
        if profiled:
            profile.enable()
        inputs = Dataset.File.from_files(given)
        config = ParallelRunConfig(
            str(script),
            mini_batch_size=mbs,
            process_count_per_node=2,
            output_action="append_row",
        )
        step = ParallelRunStep("bench", config, inputs=[inputs], output=str(work / "o"))
        run = step.run()
        profile.disable()
        total = time.perf_counter() - start
    assert run.status == "Completed", run.error
    to_first = float(first.read_text()) - start_wall
    result = dict(
        line.split(": ", 1)
        for line in Path(run.logs_dir, "job_result.txt").read_text().splitlines()
    )
    import daskrun

    if not profiled:
        return {
            "to_first_run_s": round(to_first, 3),
            "total_s": round(total, 3),
            "job": {k: v for k, v in result.items() if k.endswith("seconds")},
            "daskrun": daskrun.__file__,
        }
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("cumulative").print_stats(top)

    # the client's serial work on inputs, wherever this daskrun keeps it
    where: dict[str, float] = {}
    for (file, _, name), row in stats.stats.items():  # type: ignore[attr-defined]
        if name in WATCHED and file.startswith(os.path.dirname(daskrun.__file__)):
            where[name] = round(where.get(name, 0.0) + row[3], 3)
    return {
        "to_first_run_s": round(to_first, 3),
        "total_s": round(total, 3),
        "job": {k: v for k, v in result.items() if k.endswith("seconds")},
        "client_peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
        ),
        "daskrun": daskrun.__file__,
        "cumulative_s": where,
        "profile": text.getvalue(),
    }


def measure(n: int, as_list: bool, args: argparse.Namespace) -> dict:
    """:func:`child` in a fresh process (with ``--pythonpath`` if given)."""
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    data = str(make_files(n))
    code = (
        f"import json, sys; sys.path.insert(1, {str(HERE)!r}); "
        "import bench_client as b; from pathlib import Path; "
        f"print(json.dumps(b.child(Path({data!r}), {as_list}, {args.mbs}, "
        f"{args.top}, {args.profile})))"
    )
    proc = subprocess.run(  # not in the checkout: PYTHONPATH must win
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(CACHE),
    )
    if proc.returncode:
        sys.exit(proc.stderr)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    found["to_first_run_us_per_input"] = round(found["to_first_run_s"] / n * 1e6, 2)
    found["total_us_per_input"] = round(found["total_s"] / n * 1e6, 2)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="files (200,000)")
    parser.add_argument("--mbs", type=int, default=1000, help="mini_batch_size")
    parser.add_argument("--top", type=int, default=30, help="profile rows shown")
    parser.add_argument("--ways", nargs="+", default=["list", "folder"])
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="time only: cProfile slows the client's per-input work several-fold",
    )
    parser.add_argument("--pythonpath", help="PYTHONPATH of the measured daskrun")
    parser.add_argument("--out", help="file name in benchmarks/results/")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    found = {
        "n": args.n,
        "mini_batch_size": args.mbs,
        "profiled": args.profile,
        "pythonpath": args.pythonpath,
        "ways": {},
    }
    for way in args.ways:
        result = measure(args.n, way == "list", args)
        found["ways"][way] = result
        print(f"== by {way}: N={args.n}")
        print(result.get("profile", ""))
        print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (args.out or f"client-{args.n}.json")
    out.write_text(json.dumps(found, indent=1) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
