"""A first run of one's own script (issue 15): the script's folder travels,
run()'s signature is checked, errors point into the user's files, the job's
counts show its plan, environments are checked by what imports, and a
source directory full of data is not shipped."""

from __future__ import annotations

import os
import time
import zipfile
from importlib.metadata import version
from pathlib import Path

import dask.config
import pytest
from distributed import LocalCluster

from daskrun import ConfigError, Dataset, Environment
from daskrun.engine.bundle import BUNDLE_MAX_FILES, build_bundle
from daskrun.engine.environment import missing_packages, unmet_packages

from .helpers import daskrun, make_files, run_step, write_script

HELPER = """
import json

def parse(text):
    return json.loads(text)["name"]
"""

USES_HELPER = """
import os
import helper

def init():
    pass

def run(mini_batch):
    return [helper.parse(open(p).read()) for p in mini_batch]
"""


def _json_files(folder: Path, n: int, bad: int | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = "{not json" if i == bad else f'{{"name": "n{i}"}}'
        (folder / f"f{i:03d}.json").write_text(text)


# 4. the CLI ships the script's folder


def test_cli_ships_the_scripts_folder_by_default(
    tmp_path: Path, runs_dir: Path
) -> None:
    write_script(tmp_path / "app", HELPER, "helper.py")
    write_script(tmp_path / "app", USES_HELPER)
    _json_files(tmp_path / "data", 5)
    result = daskrun(
        "run",
        "app/score.py",
        "--input",
        "data",
        "--output",
        "out",
        "--processes",
        "1",
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == [f"n{i}" for i in range(5)]

    # --source-directory overrides: the script is then relative to it
    write_script(tmp_path / "other", HELPER.replace('["name"]', '["name"] + "!"'))
    (tmp_path / "other" / "score.py").rename(tmp_path / "other" / "helper.py")
    write_script(tmp_path / "other", USES_HELPER)
    result = daskrun(
        "run",
        "score.py",
        "--source-directory",
        "other",
        "--input",
        "data",
        "--output",
        "out2",
        "--processes",
        "1",
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out2" / "parallel_run_step.txt").read_text().splitlines()
    assert lines == [f"n{i}!" for i in range(5)]


# 5. run()'s signature is checked before any mini-batch


def test_cli_run_that_cannot_take_a_mini_batch_fails_at_once(
    tmp_path: Path, runs_dir: Path
) -> None:
    make_files(tmp_path / "data", 4)
    marker = tmp_path / "init-called"
    write_script(
        tmp_path,
        f"def init():\n    open({str(marker)!r}, 'w').close()\n"
        "def run(a, b, c):\n    return a\n",
    )
    result = daskrun(
        "run",
        "score.py",
        "--input",
        "data",
        "--output",
        "out",
        "--error-threshold",
        "-1",
        "--processes",
        "1",
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 1, result.stderr
    cause = result.stderr.strip().splitlines()[-1]
    (run_id,) = [p.name for p in runs_dir.iterdir() if p.is_dir()]
    assert cause == (
        "daskrun: job failed: run() of score.py takes `run(a, b, c)`; it must "
        "take one mini-batch: def run(mini_batch), or def run(mini_batch, "
        f"mini_batch_context); fix it, then 'daskrun resume {run_id} --new-source'"
    )
    assert not marker.exists()  # init() never ran
    assert "mini-batch 0 failed" not in result.stderr  # no mini-batch was tried
    assert not (tmp_path / "out" / "parallel_run_step.txt").exists()


@pytest.mark.parametrize(
    "definition, shown",
    [
        ("def run():\n    return []\n", "takes `run()`"),
        ("def run(*, mini_batch):\n    return []\n", "takes `run(*, mini_batch)`"),
        ("run = 5\n", "run of score.py is a int, not a function"),
        ("def run(mini_batch, context=None):\n    return mini_batch\n", None),
        ("def run(*args):\n    return args[0]\n", None),
        ("def run(mini_batch, mini_batch_context):\n    return mini_batch\n", None),
    ],
)
def test_run_signature_is_checked_on_the_workers(
    tmp_path: Path, cluster: LocalCluster, definition: str, shown: str | None
) -> None:
    make_files(tmp_path / "in", 3)
    run = run_step(
        tmp_path,
        "def init(): pass\n" + definition,
        Dataset.File.from_files(str(tmp_path / "in")),
        error_threshold=-1,
        compute_target=cluster,
    )
    if shown is None:
        assert run.status == "Completed", run.error
        assert run.items_succeeded == 3
        return
    assert run.status == "Failed"
    assert run.error is not None and shown in run.error
    assert run.error.endswith(
        "it must take one mini-batch: def run(mini_batch), or "
        "def run(mini_batch, mini_batch_context); fix it, then "
        f"'daskrun resume {run.run_id} --new-source'"
    )
    assert "\n" not in run.error
    assert run.mini_batches_failed == 0 and run.items_succeeded == 0


# 7. "raised at" names the user's own files


def _failing_run(tmp_path: Path, runs_dir: Path, script: str) -> list[str]:
    write_script(tmp_path / "app", HELPER, "helper.py")
    write_script(tmp_path / "app", script)
    _json_files(tmp_path / "data", 3, bad=1)
    result = daskrun(
        "run",
        "score.py",
        "--source-directory",
        "app",
        "--input",
        "data",
        "--output",
        "out",
        "--max-tries",
        "1",
        "--processes",
        "1",
        cwd=tmp_path,
        runs=runs_dir,
    )
    assert result.returncode == 1, result.stderr
    return result.stderr.splitlines()


def test_raised_at_names_the_deepest_frame_in_the_users_files(
    tmp_path: Path, runs_dir: Path
) -> None:
    lines = _failing_run(tmp_path, runs_dir, USES_HELPER)
    app = (tmp_path / "app").resolve()
    # json.loads raised in the standard library; the user's frame is parse()
    assert f"daskrun: raised at {app / 'helper.py'}, line 5, in parse" in lines
    # the worker's copy of helper.py is named by the user's path
    error = next(runs_dir.glob("*/logs/job_error.txt")).read_text()
    assert f'File "{app / "helper.py"}", line 5, in parse' in error


@pytest.mark.parametrize("returned", ["5", "{'a': 1}"])
def test_a_wrong_return_type_names_the_users_run(
    tmp_path: Path, runs_dir: Path, returned: str
) -> None:
    script = f"def init():\n    pass\n\n\ndef run(mini_batch):\n    return {returned}\n"
    lines = _failing_run(tmp_path, runs_dir, script)
    app = (tmp_path / "app").resolve()
    kind = "int" if returned == "5" else "dict"
    assert f"daskrun: raised at {app / 'score.py'}, line 5, in run" in lines
    assert any(f"TypeError: run() returned {kind}; return a list" in x for x in lines)
    assert not any("output.py" in x for x in lines)


# 8. job_result.txt counts the planned items


def test_job_result_counts_planned_items_when_init_fails(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    make_files(tmp_path / "in", 7)
    run = run_step(
        tmp_path,
        "def init():\n    raise OSError('model.pkl not found')\n"
        "def run(mb): return mb\n",
        Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=3,
        compute_target=cluster,
    )
    assert run.status == "Failed"
    result = (Path(run.logs_dir) / "job_result.txt").read_text().splitlines()
    assert "mini_batches_total: 3" in result
    assert "items_total: 7" in result
    assert "items_counted: files planned" in result
    assert "items_not_run: 7" in result
    assert "items_succeeded: 0" in result


def test_job_result_of_csv_inputs_says_how_rows_are_counted(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.csv").write_text("x\n" + "".join(f"{i}\n" for i in range(9)))
    run = run_step(
        tmp_path,
        "def init(): pass\ndef run(df): return list(df.x)\n",
        Dataset.Tabular.from_delimited_files(str(tmp_path / "t")),
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error
    result = (Path(run.logs_dir) / "job_result.txt").read_text().splitlines()
    assert "items_total: 9" in result
    assert any(
        x.startswith("items_counted: rows of finished mini-batches (CSV rows")
        for x in result
    )


# 9. Environment(pip_packages=...) checks what imports


def test_packages_are_met_by_the_distribution_that_provides_the_module() -> None:
    tf = version("tensorflow-cpu")
    assert missing_packages(["tensorflow", f"tensorflow>={tf}", "tensorflow-cpu"]) == []
    unmet = unmet_packages(["tensorflow==2.15", "tensorflow-cpu<1", "surely-not-here"])
    assert unmet == [
        (
            f"tensorflow==2.15 not met (tensorflow-cpu {tf} installed, "
            "which provides tensorflow)",
            "tensorflow-cpu==2.15",
        ),
        (
            f"tensorflow-cpu<1 not met (tensorflow-cpu {tf} installed)",
            "tensorflow-cpu<1",
        ),
        ("surely-not-here not installed", "surely-not-here"),
    ]


def test_environment_checks_what_imports_on_the_workers(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    make_files(tmp_path / "in", 2)
    script = "def init(): pass\ndef run(mb): return mb\n"
    inputs = Dataset.File.from_files(str(tmp_path / "in"))
    run = run_step(
        tmp_path / "a",
        script,
        inputs,
        environment=Environment("tf", pip_packages=["tensorflow"]),
        compute_target=cluster,
    )
    assert run.status == "Completed", run.error

    # a pin not met runs with a warning (daskrun.environment.strict: false,
    # see test_aml_compat); strict refuses it, on the workers
    with dask.config.set({"daskrun.environment.strict": True}):
        run = run_step(
            tmp_path / "b",
            script,
            inputs,
            environment=Environment("tf", pip_packages=["tensorflow==2.15"]),
            compute_target=cluster,
        )
    assert run.status == "Failed"
    error = run.error or ""
    tf = version("tensorflow-cpu")
    assert f"tensorflow==2.15 not met (tensorflow-cpu {tf} installed" in error
    assert "pip install 'tensorflow-cpu==2.15'" in error
    assert "pip install 'tensorflow'" not in error
    assert "pip install tensorflow" not in error
    assert "'tensorflow==2.15')" not in error  # never a second copy


# 11. a source directory that holds data is not shipped whole

DATA_FILES = 5
DATA_FILE_SIZE = 100 * 1024**2  # 500 MB in all, sparse on disk


def _app_beside_data(folder: Path) -> Path:
    write_script(folder, HELPER, "helper.py")
    script = write_script(folder, USES_HELPER)
    data = folder / "data"
    data.mkdir()
    for i in range(DATA_FILES):
        with open(data / f"part-{i}.csv", "wb") as f:
            f.truncate(DATA_FILE_SIZE)
    return script


@pytest.mark.slow
def test_data_beside_the_script_is_left_out_or_refused(
    tmp_path: Path, runs_dir: Path
) -> None:
    app = tmp_path / "app"
    _app_beside_data(app)
    _json_files(tmp_path / "in", 3)

    # without an ignore file: refused at once, in one line, nothing started
    began = time.perf_counter()
    result = daskrun(
        "run", "app/score.py", "--input", "in", "--output", "out",
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    seconds = time.perf_counter() - began
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("daskrun: error: --source-directory ")
    assert "7 files, 500.0 MB" in lines[0]
    assert "largest: data/ (500.0 MB, 5 files)" in lines[0]
    assert f"list what is not code in {app.resolve() / '.daskrunignore'}" in lines[0]
    assert not runs_dir.exists()
    print(f"refused in {seconds:.2f} s (a daskrun process, start to exit)")

    # with one: the bundle holds the code only, and the run completes
    (app / ".daskrunignore").write_text("data/\n")
    result = daskrun(
        "run", "app/score.py", "--input", "in", "--output", "out", "--processes", "1",
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (source,) = runs_dir.glob("*/source.zip")
    with zipfile.ZipFile(source) as zf:
        assert sorted(zf.namelist()) == [".daskrunignore", "helper.py", "score.py"]
    assert source.stat().st_size < 10_000


def test_amlignore_else_gitignore_and_daskrunignore(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_script(src, "def init(): pass\ndef run(mb): return mb\n")
    (src / "model.onnx").write_bytes(b"m")
    (src / "table.csv").write_text("a\n")
    (src / "notes.txt").write_text("n")
    (src / "raw").mkdir()
    (src / "raw" / "x.bin").write_bytes(b"x")
    (src / "lib").mkdir()
    (src / "lib" / "util.py").write_text("")
    (src / "lib" / "cache.tmp").write_text("")
    (src / "lib" / ".gitignore").write_text("*.tmp\n")
    (src / ".gitignore").write_text("*.csv\nraw/\n")

    make_files(src / "out", 3)  # the step's output folder is never source

    def shipped() -> list[str]:
        path, _ = build_bundle(
            str(src / "score.py"), str(src), tmp_path / "cache", [str(src / "out")]
        )
        with zipfile.ZipFile(path) as zf:
            return sorted(zf.namelist())

    assert shipped() == [
        ".gitignore", "lib/.gitignore", "lib/util.py", "model.onnx", "notes.txt",
        "score.py",
    ]  # fmt: skip
    # .amlignore takes the place of .gitignore; .daskrunignore adds to it
    (src / ".amlignore").write_text("*.onnx\n")
    # (and the entry script travels even where a pattern names it)
    (src / ".daskrunignore").write_text("notes.txt\nscore.py\n")
    assert shipped() == [
        ".amlignore", ".daskrunignore", ".gitignore", "lib/.gitignore",
        "lib/util.py", "raw/x.bin", "score.py", "table.csv",
    ]  # fmt: skip


def test_bundle_is_built_again_only_when_the_folder_changed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    script = write_script(src, "def init(): pass\ndef run(mb): return mb\n")
    write_script(src, "X = 1\n", "helper.py")
    cache = tmp_path / "cache"
    first, rel = build_bundle(str(script), str(src), cache)
    built = first.stat().st_mtime_ns
    again, _ = build_bundle(str(script), str(src), cache)
    assert (again, rel) == (first, "score.py")
    with zipfile.ZipFile(again) as zf:  # the same file, not a new one
        assert zf.read("helper.py") == b"X = 1\n"
    assert len(list(cache.iterdir())) == 1
    os.utime(first, ns=(built, built))
    (src / "helper.py").write_text("X = 22\n")
    changed, _ = build_bundle(str(script), str(src), cache)
    assert changed != first
    with zipfile.ZipFile(changed) as zf:
        assert zf.read("helper.py") == b"X = 22\n"


def test_too_many_files_are_refused_naming_the_largest_entries(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    write_script(src, "def init(): pass\ndef run(mb): return mb\n")
    make_files(src / "images", BUNDLE_MAX_FILES)
    (src / ".gitignore").write_text("*.pyc\n")
    with pytest.raises(ConfigError) as e:
        build_bundle(str(src / "score.py"), str(src), tmp_path / "cache")
    message = str(e.value)
    assert "\n" not in message
    assert f"holds {BUNDLE_MAX_FILES + 2} files" in message
    assert "largest: images/ (" in message
    assert f"KB, {BUNDLE_MAX_FILES} files), score.py (" in message
    assert f"list what is not code in {src.resolve() / '.gitignore'}" in message
    assert not (tmp_path / "cache").exists()


def test_input_folders_beside_the_script_are_data_not_source(
    tmp_path: Path, runs_dir: Path
) -> None:
    # `daskrun run score.py --input images/`, the images beside the script:
    # they reach the workers as paths, never in the bundle, so no limit hits
    write_script(
        tmp_path,
        "import os\ndef init(): pass\n"
        "def run(mb): return [os.path.basename(p) for p in mb]\n",
    )
    make_files(tmp_path / "images", BUNDLE_MAX_FILES + 10)
    result = daskrun(
        "run", "score.py", "--input", "images", "--output", "out",
        "--mini-batch-size", "500", "--processes", "1", "-q",
        cwd=tmp_path, runs=runs_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = (tmp_path / "out" / "parallel_run_step.txt").read_text().splitlines()
    assert len(lines) == BUNDLE_MAX_FILES + 10
    (run_dir,) = [d for d in runs_dir.iterdir() if d.is_dir()]
    with zipfile.ZipFile(run_dir / "source.zip") as z:
        assert z.namelist() == ["score.py"]
