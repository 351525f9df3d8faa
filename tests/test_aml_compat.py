"""Azure ML drop-in (issue 17): ParallelRunStep entry scripts run unchanged
on real worker processes, driver code runs with ``daskrun.install_as_azureml()``
added, and an installed Azure ML SDK is never shadowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import daskrun
from daskrun import (
    Dataset,
    Experiment,
    Model,
    ParallelRunConfig,
    ParallelRunStep,
    Pipeline,
    Workspace,
)
from daskrun.aml import MODULES

from .helpers import REPO, make_files, write_script
from .helpers import daskrun as daskrun_cli

# an Azure ML entry script, byte for byte: the SDK's imports, the model
# through azureml.core.Model, the output folder from AZUREML_BI_OUTPUT_PATH
FILE_SCRIPT = """\
import os
import sys

from azureml.core import Model
from azureml.core.model import Model as ModelToo
from azureml_user.parallel_run import EntryScript


def init():
    global offset
    assert Model is ModelToo
    with open(Model.get_model_path("adder", version=1)) as f:
        offset = int(f.read())
    EntryScript().logger.info("model adder loaded: offset %d", offset)


def run(mini_batch):
    out = os.environ["AZUREML_BI_OUTPUT_PATH"]
    assert out == os.environ["DASKRUN_OUTPUT_PATH"] == EntryScript().output_dir
    registry = "sqlite3" in sys.modules or "daskrun.models" in sys.modules
    results = []
    for path in mini_batch:
        with open(path) as f:
            value = int(f.read())
        results.append(f"{os.path.basename(path)} {value + offset} {registry}")
    return results
"""

TABULAR_SCRIPT = """\
from azureml.core import Run
from azureml_user.parallel_run import EntryScript


def init():
    Run.get_context().log_list("classes", [0, 1, 2])


def run(mini_batch):
    run = Run.get_context()
    EntryScript().logger.info("scoring %d rows", len(mini_batch))
    run.log("rows", len(mini_batch))
    run.log_row("batches", rows=len(mini_batch), first=int(mini_batch["a"].iloc[0]))
    run.tag("seen", f"{run.id} {run.experiment.name} {run.parent.id}")
    run.parent.log("pipeline_rows", len(mini_batch))
    return [f"{a} {b} {a * b}" for a, b in zip(mini_batch["a"], mini_batch["b"])]
"""


def _workspace(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path / "ws")


def test_file_entry_script_runs_unchanged_with_its_model(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    (tmp_path / "model.txt").write_text("1000")
    Model.register(ws, tmp_path / "model.txt", "adder")
    (tmp_path / "model.txt").write_text("7")  # version 2: not the one asked for
    Model.register(ws, tmp_path / "model.txt", "adder")
    make_files(tmp_path / "in", 9)
    script = write_script(tmp_path / "src", FILE_SCRIPT, "score.py")

    config = ParallelRunConfig(
        entry_script="score.py",
        source_directory=str(script.parent),
        error_threshold=0,
        output_action="append_row",
        mini_batch_size=2,
        process_count_per_node=2,
    )
    step = ParallelRunStep(
        "add-offset",
        config,
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=str(tmp_path / "out"),
    )
    run = step.run(workspace=ws)
    assert run.status == "Completed", run.error

    # a plain loop over the same files
    expected = [
        f"{p.name} {int(p.read_text()) + 1000} False"
        for p in sorted((tmp_path / "in").iterdir())
    ]
    assert Path(run.output_path or "").read_text().splitlines() == expected
    logs = Path(run.logs_dir, "user", "entry_script_log")
    assert "model adder loaded: offset 1000" in "".join(
        p.read_text() for p in logs.iterdir()
    )


def test_tabular_entry_script_logs_metrics_into_the_run_record(
    tmp_path: Path, runs_dir: Path
) -> None:
    ws = _workspace(tmp_path)
    frames = []
    for n in range(3):
        df = pd.DataFrame({"a": range(n * 100, n * 100 + 60), "b": range(60)})
        df.to_csv(tmp_path / f"part{n}.csv", index=False)
        frames.append(df)
    data = Dataset.Tabular.from_delimited_files(str(tmp_path / "part*.csv"))
    script = write_script(tmp_path / "src", TABULAR_SCRIPT, "score.py")
    config = ParallelRunConfig(
        entry_script=str(script),
        error_threshold=0,
        output_action="append_row",
        mini_batch_size="300",
        process_count_per_node=2,
    )
    step = ParallelRunStep(
        "score-rows", config, inputs=[data], output=str(tmp_path / "out")
    )
    pipeline_run = Experiment(ws, "aml-compat").submit(Pipeline(ws, [step]))
    pipeline_run.wait_for_completion(show_output=False)
    step_run = pipeline_run.find_step_run("score-rows")[0]
    assert step_run.status == "Completed", step_run.error

    # pandas reference: every row, in input order
    whole = pd.concat(frames, ignore_index=True)
    assert data.to_pandas_dataframe().equals(whole)
    expected = [f"{a} {b} {a * b}" for a, b in zip(whole["a"], whole["b"], strict=True)]
    output = Path(step_run.output_path or "").read_text().splitlines()
    assert output == expected

    # the metrics every worker logged are in the run record
    metrics = step_run.get_metrics()
    batches = step_run.mini_batches_total
    assert batches > 3  # "300" bytes cut each file into several mini-batches
    assert sum(metrics["rows"]) == len(whole) and len(metrics["rows"]) == batches
    assert metrics["classes"] == [0, 1, 2]
    assert sum(metrics["batches"]["rows"]) == len(whole)
    assert sorted(metrics["batches"]["first"]) == sorted(
        int(v) for v in metrics["batches"]["first"]
    )
    seen = f"{step_run.id} aml-compat {pipeline_run.id}"
    assert step_run.get_tags() == {"seen": seen}

    # and `daskrun runs show` prints them: the step's, and the pipeline's
    shown = daskrun_cli(
        "runs", "show", step_run.id, "--json", cwd=tmp_path, runs=ws.runs_dir
    )
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["metrics"]["classes"] == [0, 1, 2]
    assert record["tags"] == {"seen": seen}
    text = daskrun_cli("runs", "show", step_run.id, cwd=tmp_path, runs=ws.runs_dir)
    assert "metrics:\n" in text.stdout and "  classes: [0, 1, 2]" in text.stdout
    parent = daskrun_cli(
        "runs", "show", pipeline_run.id, "--json", cwd=tmp_path, runs=ws.runs_dir
    )
    assert sum(json.loads(parent.stdout)["metrics"]["pipeline_rows"]) == len(whole)


def test_offline_run_outside_a_worker() -> None:
    run = daskrun.Run.get_context()
    run.log("loss", 0.5)
    run.log("loss", 0.25)
    run.log_row("table", x=1, y=2)
    run.tag("kind")
    assert run.get_metrics() == {"loss": [0.5, 0.25], "table": {"x": [1], "y": [2]}}
    assert run.get_tags() == {"kind": ""} and run.parent is None
    assert run.experiment.name == "daskrun"
    with pytest.raises(TypeError, match=r"metric 'loss': list .* float\(value\)"):
        run.log("loss", [1, 2])
    with pytest.raises(RuntimeError, match="allow_offline=True"):
        daskrun.Run.get_context(allow_offline=False)


def _python(code: str, tmp_path: Path, path: list[Path] = ()) -> str:  # type: ignore[assignment]
    """Run ``code`` in a fresh interpreter with ``path`` first on sys.path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in path), str(REPO)])
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_azureml_name_resolves_to_daskrun(tmp_path: Path) -> None:
    out = _python(
        """
        import importlib, json, sys
        import daskrun
        from daskrun.aml import MODULES
        daskrun.install_as_azureml()
        found = {}
        for module_name, names in MODULES.items():
            module = importlib.import_module(module_name)
            for name in names:
                value = getattr(module, name)
                where = f"{module_name}.{name}"
                found[where] = value if isinstance(value, str) else (
                    f"{value.__module__}.{value.__name__}"
                )
        from azureml.core import Workspace, VERSION
        from azureml.pipeline.steps import ParallelRunStep
        assert Workspace is daskrun.Workspace and VERSION == daskrun.__version__
        assert ParallelRunStep is daskrun.ParallelRunStep
        try:
            from azureml.core import ScriptRunConfig
        except ImportError as e:
            missing = str(e)
        print(json.dumps({"found": found, "missing": missing}))
        """,
        tmp_path,
    )
    result = json.loads(out)
    assert len(result["found"]) == sum(len(names) for names in MODULES.values())
    assert result["found"]["azureml.core.Model"] == "daskrun.models.Model"
    assert result["found"]["azureml.core.compute.AmlCompute"] == (
        "daskrun.compute.AmlCompute"
    )
    assert "ScriptRunConfig" in result["missing"]


def test_a_worker_resolves_azureml_without_the_registry(tmp_path: Path) -> None:
    # what the plugin installs before it imports an entry script
    out = _python(
        """
        import sys
        from daskrun.aml import install_entry_script_shims
        install_entry_script_shims()
        from azureml.core import Model, Run
        from azureml.core.model import Model as ModelToo
        from azureml_user.parallel_run import EntryScript
        import daskrun.modelrefs, daskrun.plugin, daskrun.runcontext
        assert Model is ModelToo is daskrun.modelrefs.Model
        assert Run is daskrun.runcontext.Run
        assert EntryScript is daskrun.plugin.EntryScript
        loaded = [m for m in ("sqlite3", "daskrun.models", "daskrun.registry",
                              "daskrun.workspace", "daskrun.step") if m in sys.modules]
        print(loaded)
        try:
            Model.get_model_path("m")
        except Exception as e:
            print(e)
        """,
        tmp_path,
    )
    loaded, error = out.splitlines()
    assert loaded == "[]"
    assert "without a workspace" in error and "step.run(workspace=ws)" in error


def test_an_installed_azureml_is_never_shadowed(tmp_path: Path) -> None:
    # a stand-in for the real SDK: azureml.core only (no azureml.pipeline),
    # and azureml_user
    fake = tmp_path / "site"
    for package, body in {
        "azureml": "",
        "azureml/core": "Model = 'real Model'\nVERSION = '1.57.0'\n",
        "azureml_user": "",
        "azureml_user/parallel_run": "EntryScript = 'real EntryScript'\n",
    }.items():
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text(body)
    out = _python(
        """
        import daskrun
        from daskrun.aml import install_entry_script_shims
        daskrun.install_as_azureml()
        install_entry_script_shims()
        from azureml.core import Model, VERSION
        from azureml_user.parallel_run import EntryScript
        print(Model, VERSION, EntryScript, sep="|")
        try:
            import azureml.pipeline.steps
        except ModuleNotFoundError as e:
            print("not served:", e.name)
        """,
        tmp_path,
        [fake],
    )
    assert out.splitlines() == [
        "real Model|1.57.0|real EntryScript",
        "not served: azureml.pipeline",
    ]


def test_aml_compute_is_a_local_cluster_of_up_to_max_nodes(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    from daskrun import AmlCompute, ComputeTarget

    config = AmlCompute.provisioning_configuration(
        vm_size="STANDARD_D2_V2", min_nodes=0, max_nodes="2", admin_user_password="pw"
    )
    target = ComputeTarget.create(ws, "cpucluster", config)
    assert type(target) is AmlCompute
    assert type(ws.compute_targets["cpucluster"]) is AmlCompute
    status = target.get_status()
    assert status == "Succeeded"
    assert status.serialize()["vm_size"] == "STANDARD_D2_V2"
    assert status.serialize()["max_nodes"] == 2
    assert "pw" not in json.dumps(target.options)  # a password is never kept
    with pytest.raises(daskrun.ConfigError, match=r"max_nodes=0 is not a whole"):
        AmlCompute.provisioning_configuration(max_nodes=0)
    with pytest.raises(daskrun.ConfigError, match=r"min_nodes=3 is more than"):
        AmlCompute.provisioning_configuration(min_nodes=3, max_nodes=2)

    make_files(tmp_path / "in", 4)
    script = write_script(
        tmp_path, "def init(): pass\ndef run(mb): return [len(mb)] * len(mb)\n"
    )

    def run_on(node_count: int) -> daskrun.StepRun:
        cfg = ParallelRunConfig(
            str(script),
            error_threshold=0,
            output_action="summary_only",
            mini_batch_size=1,
            compute_target=target,
            node_count=node_count,
            process_count_per_node=1,
        )
        step = ParallelRunStep(
            "on-aml", cfg, inputs=[Dataset.File.from_files(str(tmp_path / "in"))]
        )
        return step.run(workspace=ws)

    assert run_on(2).items_succeeded == 4
    with pytest.raises(daskrun.ConfigError, match=r"node_count=3 is more than"):
        run_on(3)


def test_conda_dependencies_are_checked_as_pip_packages() -> None:
    from daskrun import CondaDependencies, Environment

    deps = CondaDependencies.create(
        pip_packages=["pillow>=1", "azureml-core", "azureml-dataset-runtime[fuse]"],
        conda_packages=["python=3.11", "numpy=1.26", "pip"],
    )
    env = Environment(name="batch", pip_packages=["pandas"])
    env.python.conda_dependencies = deps
    env.docker.enabled = True
    env.docker.base_image = "mcr.microsoft.com/azureml/anything"
    assert env.pip_packages == ["pandas", "pillow>=1", "numpy"]
    assert "numpy=1.26" in deps.serialize_to_string()
    with pytest.raises(daskrun.ConfigError, match=r"'pillow!!' is not a requirement"):
        CondaDependencies.create(pip_packages=["pillow!!"])
    with pytest.raises(daskrun.ConfigError, match=r"is one string; pass a list"):
        CondaDependencies.create(pip_packages="pillow")


def test_datastore_and_file_dataset_transfers(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    store = ws.get_default_datastore()
    src = tmp_path / "src"
    make_files(src / "a", 2)
    make_files(src / "b", 1, prefix="g")

    store.upload(str(src), target_path="up", overwrite=True, show_progress=False)
    store.upload_files(
        [src / "a" / "f00000.txt", src / "b" / "g00000.txt"],
        relative_root=str(src),
        target_path="files",
        show_progress=False,
    )
    with pytest.raises(daskrun.ConfigError, match=r"relative_root=.* does not hold"):
        store.upload_files([tmp_path / "src" / "a" / "f00001.txt"], str(src / "b"))

    got = tmp_path / "got"
    assert store.download(str(got), prefix="files", show_progress=False) == 2
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*.txt")) == [
        "files/a/f00000.txt",
        "files/b/g00000.txt",
    ]
    with pytest.raises(daskrun.ConfigError, match="overwrite=True"):
        store.download(str(got), prefix="files", show_progress=False)

    files = Dataset.File.from_files(store.path("up/"))
    assert files.to_path() == ["/a/f00000.txt", "/a/f00001.txt", "/b/g00000.txt"]
    local = files.download(tmp_path / "dl")
    assert [Path(p).read_text() for p in local] == ["0", "1", "0"]
    with pytest.raises(daskrun.ConfigError, match="overwrite=True"):
        files.download(tmp_path / "dl")
