"""Azure ML drop-in (issue 17): ParallelRunStep entry scripts run unchanged
on real worker processes, driver code runs with ``daskrun.install_as_azureml()``
added, and an installed Azure ML SDK is never shadowed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dask.config
import pandas as pd
import pytest
from distributed import LocalCluster

import daskrun
from daskrun import (
    Dataset,
    Experiment,
    JobFailedError,
    Model,
    ParallelRunConfig,
    ParallelRunStep,
    Pipeline,
    Workspace,
)
from daskrun.aml import MODULES

from .helpers import (
    REPO,
    cell_text,
    execute_notebook,
    make_files,
    poison_rows,
    run_step,
    write_script,
)
from .helpers import daskrun as daskrun_cli
from .scripts import ROWS_SCRIPT

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
    registry = "sqlite3" in sys.modules or "daskrun.registry.models" in sys.modules
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
        from azureml.core.runconfig import CondaDependencies
        assert CondaDependencies is daskrun.CondaDependencies
        try:
            from azureml.core import ScriptRunConfig
        except daskrun.NotProvidedError as e:
            missing = str(e)
        import azureml.core
        try:
            azureml.core.ScriptRunConfig
        except AttributeError as e:  # attribute access: still AttributeError
            attribute = type(e).__name__
        absent = getattr(azureml.core, "Anything", None), hasattr(azureml.core, "X")
        print(json.dumps({"found": found, "missing": missing,
                          "attribute": attribute, "absent": absent}))
        """,
        tmp_path,
    )
    result = json.loads(out)
    assert len(result["found"]) == sum(len(names) for names in MODULES.values())
    assert result["found"]["azureml.core.Model"] == "daskrun.registry.models.Model"
    assert result["found"]["azureml.core.compute.AmlCompute"] == (
        "daskrun.registry.compute.AmlCompute"
    )
    assert result["found"]["azureml.core.runconfig.CondaDependencies"] == (
        "daskrun.engine.environment.CondaDependencies"
    )
    # `from azureml.core import X` names X, says daskrun lacks it, and what
    # to use instead, in one line (not "cannot import name ... (unknown
    # location)")
    missing = result["missing"]
    assert "\n" not in missing
    assert missing.startswith(
        "daskrun does not provide azureml.core.ScriptRunConfig (its stand-in "
        "azureml.core has: ComputeTarget, Dataset,"
    ), missing
    assert "instead: run the script with plain Python, or as a ParallelRunStep" in (
        missing
    )
    assert result["attribute"] == "AttributeError"
    assert result["absent"] == [None, False]


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
        import daskrun.aml.modelrefs, daskrun.engine.plugin, daskrun.aml.runcontext
        assert Model is ModelToo is daskrun.aml.modelrefs.Model
        assert Run is daskrun.aml.runcontext.Run
        assert EntryScript is daskrun.engine.plugin.EntryScript
        loaded = [m for m in sys.modules
                  if m == "sqlite3" or m.startswith("daskrun.registry")]
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
        from daskrun.aml import install_entry_script_shims
        install_entry_script_shims()  # a worker's: its entry script gets the SDK
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


def test_install_as_azureml_beside_another_azureml_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    """Driver code asking for daskrun's names where another ``azureml``
    package is importable would get that package's: refused, naming it."""
    fake = tmp_path / "site" / "azureml"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    out = _python(
        """
        import daskrun
        try:
            daskrun.install_as_azureml()
        except daskrun.ConfigError as e:
            print(e)
        """,
        tmp_path,
        [tmp_path / "site"],
    )
    (line,) = out.splitlines()
    assert line.startswith(
        "install_as_azureml(): another 'azureml' package is importable "
        f"({fake / '__init__.py'}), and daskrun never shadows it"
    ), line
    assert "pip uninstall azureml-core" in line
    assert "from daskrun import Workspace, ParallelRunStep" in line


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


# ParallelRunStep's tutorial, as an Azure ML user's notebook: Azure ML's
# imports throughout, and one daskrun line. On Azure the workspace exists
# already (config.json); the test creates it, as the user would have.
NOTEBOOK = [
    "import daskrun; daskrun.install_as_azureml()",
    """\
import os
from azureml.core import VERSION, Workspace

print("SDK version:", VERSION)
ws = Workspace.from_config()""",
    """\
from azureml.core.compute import AmlCompute, ComputeTarget
from azureml.core.compute_target import ComputeTargetException

compute_name = os.environ.get("AML_COMPUTE_CLUSTER_NAME", "cpucluster")
compute_min_nodes = os.environ.get("AML_COMPUTE_CLUSTER_MIN_NODES", 0)
compute_max_nodes = os.environ.get("AML_COMPUTE_CLUSTER_MAX_NODES", 2)
vm_size = os.environ.get("AML_COMPUTE_CLUSTER_SKU", "STANDARD_D2_V2")

if compute_name in ws.compute_targets:
    compute_target = ws.compute_targets[compute_name]
    if compute_target and type(compute_target) is AmlCompute:
        print("found compute target. just use it. " + compute_name)
else:
    print("creating a new compute target...")
    provisioning_config = AmlCompute.provisioning_configuration(
        vm_size=vm_size, min_nodes=compute_min_nodes, max_nodes=compute_max_nodes
    )
    compute_target = ComputeTarget.create(ws, compute_name, provisioning_config)
    compute_target.wait_for_completion(
        show_output=True, min_node_count=None, timeout_in_minutes=20
    )
    print(compute_target.get_status().serialize())""",
    """\
from azureml.core import Datastore

os.makedirs("sample_data", exist_ok=True)
for i in range(12):
    with open(f"sample_data/{i}.txt", "w") as f:
        f.write(str(i))
def_data_store = ws.get_default_datastore()
def_data_store.upload_files(
    files=[f"sample_data/{i}.txt" for i in range(12)],
    relative_root="sample_data",
    target_path="mnist/",
    overwrite=True,
    show_progress=True,
)""",
    """\
from azureml.core.dataset import Dataset
from azureml.data.dataset_consumption_config import DatasetConsumptionConfig
from azureml.pipeline.core import Pipeline, PipelineData, PipelineParameter

path_on_datastore = def_data_store.path("mnist/")
input_mnist_ds = Dataset.File.from_files(path=path_on_datastore, validate=False)
pipeline_param = PipelineParameter(name="mnist_param", default_value=input_mnist_ds)
input_mnist_ds_consumption = DatasetConsumptionConfig(
    "minist_param_config", pipeline_param
).as_mount()
output_dir = PipelineData(name="inferences", datastore=def_data_store)""",
    """\
from azureml.core.model import Model

os.makedirs("models", exist_ok=True)
with open("models/offset.txt", "w") as f:
    f.write("100")
model = Model.register(
    model_path="models/",
    model_name="mnist",
    tags={"pretrained": "mnist"},
    description="Mnist trained tensorflow model",
    workspace=ws,
)""",
    """\
%%writefile scripts/digit_identification.py
import os

from azureml.core import Model, Run
from azureml_user.parallel_run import EntryScript


def init():
    global offset
    model_path = Model.get_model_path("mnist")
    with open(os.path.join(model_path, "offset.txt")) as f:
        offset = int(f.read())


def run(mini_batch):
    logger = EntryScript().logger
    resultList = []
    for image in mini_batch:
        with open(image) as f:
            resultList.append(
                "{}: {}".format(os.path.basename(image), int(f.read()) + offset)
            )
    logger.info("scored %d files", len(mini_batch))
    Run.get_context().log("files", len(mini_batch))
    return resultList""",
    """\
from azureml.core.environment import Environment
from azureml.core.conda_dependencies import CondaDependencies
from azureml.core.runconfig import DEFAULT_CPU_IMAGE

batch_conda_deps = CondaDependencies.create(
    pip_packages=["pandas", "azureml-core", "azureml-dataset-runtime[pandas, fuse]"]
)
batch_env = Environment(name="batch_environment")
batch_env.python.conda_dependencies = batch_conda_deps
batch_env.docker.enabled = True
batch_env.docker.base_image = DEFAULT_CPU_IMAGE""",
    """\
from azureml.pipeline.steps import ParallelRunConfig, ParallelRunStep

parallel_run_config = ParallelRunConfig(
    source_directory="scripts",
    entry_script="digit_identification.py",
    mini_batch_size=PipelineParameter(name="batch_size_param", default_value="5"),
    error_threshold=10,
    output_action="append_row",
    append_row_file_name="mnist_outputs.txt",
    environment=batch_env,
    compute_target=compute_target,
    process_count_per_node=PipelineParameter(
        name="process_count_param", default_value=1
    ),
    node_count=2,
)
parallelrun_step = ParallelRunStep(
    name="predict-digits-mnist",
    parallel_run_config=parallel_run_config,
    inputs=[input_mnist_ds_consumption],
    output=output_dir,
    allow_reuse=True,
)""",
    """\
from azureml.core.experiment import Experiment
from azureml.widgets import RunDetails

pipeline = Pipeline(workspace=ws, steps=[parallelrun_step])
experiment = Experiment(ws, "digit_identification")
pipeline_run = experiment.submit(pipeline)
RunDetails(pipeline_run).show()
pipeline_run.wait_for_completion(show_output=True)""",
    """\
path_on_datastore = def_data_store.path("mnist/0.txt")
single_image_ds = Dataset.File.from_files(path=path_on_datastore, validate=False)
pipeline_run_2 = experiment.submit(
    pipeline,
    pipeline_parameters={
        "mnist_param": single_image_ds,
        "batch_size_param": "1",
        "process_count_param": 1,
    },
)
pipeline_run_2.wait_for_completion(show_output=True)""",
    """\
import json
import tempfile

import pandas as pd

results = {}
for name, run in (("first", pipeline_run), ("second", pipeline_run_2)):
    batch_run = run.find_step_run(parallelrun_step.name)[0]
    batch_output = batch_run.get_output_data(output_dir.name)
    target_dir = tempfile.mkdtemp()
    batch_output.download(local_path=target_dir)
    result_file = os.path.join(
        target_dir, batch_output.path_on_datastore,
        parallel_run_config.append_row_file_name,
    )
    df = pd.read_csv(result_file, delimiter=":", header=None)
    df.columns = ["Filename", "Prediction"]
    results[name] = {
        "rows": df.values.tolist(),
        "metrics": batch_run.get_metrics(),
        "mini_batches": batch_run.mini_batches_total,
    }
print("RESULTS " + json.dumps(results))""",
]


def test_parallel_run_step_tutorial_notebook_runs_with_one_line_added(
    tmp_path: Path,
    kernel: str,  # noqa: F811 (test_notebook's fixture)
) -> None:
    import nbformat

    Workspace.create(tmp_path / "ws").write_config(tmp_path)
    (tmp_path / "scripts").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in NOTEBOOK]
    sources = "\n".join(NOTEBOOK)
    assert sources.count("daskrun") == 2  # the one line: import and install
    execute_notebook(nb, tmp_path, kernel)

    printed = {i: cell_text(cell) for i, cell in enumerate(nb.cells)}
    assert "creating a new compute target..." in printed[2]
    assert "'vm_size': 'STANDARD_D2_V2'" in printed[2]
    assert "uploaded 12 files" in printed[3]
    line = next(x for x in printed[11].splitlines() if x.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))

    # a plain loop: files in path order, each value + the model's offset
    names = sorted(f"{i}.txt" for i in range(12))
    first = results["first"]
    assert first["rows"] == [[n, int(n.split(".")[0]) + 100] for n in names]
    assert first["mini_batches"] == 3  # batch_size_param "5"
    assert sum(first["metrics"]["files"]) == 12
    # resubmitted with one file and a mini-batch size of 1
    second = results["second"]
    assert second["rows"] == [["0.txt", 100]]
    assert second["mini_batches"] == 1 and second["metrics"] == {"files": 1}


# Azure ML's partitioned entry script: the SDK's imports, and run() with the
# mini-batch's context (partition_key_value, minibatch_index, dataset)
PARTITION_SCRIPT = """\
import os

from azureml.core import Run
from azureml_user.parallel_run import EntryScript


def init():
    EntryScript().logger.info("ready")


def run(mini_batch, mini_batch_context):
    keys = mini_batch_context.partition_key_value
    name = type(mini_batch_context.dataset).__name__
    where = f"{mini_batch_context.minibatch_index} {name}"
    Run.get_context().log("partitions", 1)
    if hasattr(mini_batch, "columns"):  # a table: the partition's rows
        return [f"{where} {keys['region']} {r} {a}"
                for r, a in zip(mini_batch["region"], mini_batch["amount"])]
    return [f"{where} {keys['user']} {os.path.basename(p)} {open(p).read()}"
            for p in mini_batch]
"""


def test_partitioned_entry_scripts_run_unchanged(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    script = write_script(tmp_path / "src", PARTITION_SCRIPT, "score.py")

    def run(inputs: Any, name: str) -> list[str]:
        config = ParallelRunConfig(
            entry_script="score.py",
            source_directory=str(script.parent),
            error_threshold=0,
            output_action="append_row",
            partition_keys=["region"] if name == "sales" else ["user"],
            process_count_per_node=2,
        )
        out = str(tmp_path / f"out-{name}")
        step = ParallelRunStep(f"by-{name}", config, inputs=[inputs], output=out)
        result = step.run(workspace=ws)
        assert result.status == "Completed", result.error
        assert result.get_metrics()["partitions"]  # Run.get_context().log
        return Path(result.output_path or "").read_text().splitlines()

    # a partitioned file data set: a plain loop over the files, by user
    for i in range(7):
        path = tmp_path / "audio" / ["ann", "bo"][i % 2] / f"{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(i * i))
    audio = Dataset.File.from_files(
        str(tmp_path / "audio"), partition_format="/{user}/{fname}.wav"
    )
    got = run(audio.as_named_input("audio"), "audio")
    expected = [
        f"{index} FileDataset {user} {p.name} {p.read_text()}"
        for index, user in enumerate(["ann", "bo"])
        for p in sorted((tmp_path / "audio" / user).iterdir())
    ]
    assert got == expected

    # a partition_by tabular data set: pandas, grouped by region
    store = ws.get_default_datastore()
    frame = pd.DataFrame(
        {"region": [["n", "s", "e"][i % 3] for i in range(30)], "amount": range(30)}
    )
    frame.to_csv(tmp_path / "sales.csv", index=False)
    sales = Dataset.Tabular.from_delimited_files(str(tmp_path / "sales.csv"))
    parts = sales.partition_by(["region"], store.path("sales/"), name="sales")
    got = run(parts, "sales")
    expected = [
        f"{index} TabularDataset {region} {region} {amount}"
        for index, (region, group) in enumerate(frame.groupby("region", sort=True))
        for amount in group["amount"]
    ]
    assert got == expected


# --- issue 27: Azure ML's own notebooks, with one line added ---------------


def test_from_config_without_a_config_opens_the_default_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    default = tmp_path / "default-ws"
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    with dask.config.set({"daskrun.default-workspace": str(default)}):
        ws = Workspace.from_config()
        first = capsys.readouterr().out
        again = Workspace.from_config()
        second = capsys.readouterr().out
    assert ws == again and ws.path == default and (default / "workspace.db").is_file()
    where = str(tmp_path / "project")
    assert first == (
        f"daskrun: no workspace config in {where!r} or its parents; created the "
        f"default local workspace {str(default)!r} (ws.write_config() in a project "
        "folder picks another)\n"
    )
    assert second == first.replace("created the", "using the")
    # what Azure ML's notebooks print of a workspace
    assert (ws.location, ws.subscription_id, ws.resource_group) == ("local",) * 3
    # a path given is looked up only, never a default
    with pytest.raises(daskrun.ConfigError, match="no daskrun workspace in"):
        Workspace.from_config(tmp_path / "project")


ENV_SCRIPT = """\
import pandas

def init():
    pass

def run(mini_batch):
    return [f"{pandas.__name__} {len(mini_batch)}"] * len(mini_batch)
"""


def test_environment_pins_warn_before_the_cluster_starts(
    tmp_path: Path,
    runs_dir: Path,
    cluster: LocalCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from daskrun import CondaDependencies, Environment

    make_files(tmp_path / "in", 3)
    inputs = Dataset.File.from_files(str(tmp_path / "in"))
    pandas_version = version("pandas")
    tf_version = version("tensorflow-cpu")

    def env(*extra: str) -> Environment:
        environment = Environment(name="predict_environment")
        environment.python.conda_dependencies = CondaDependencies.create(
            python_version="3.8",
            conda_packages=["pip==20.2.4"],
            pip_packages=[
                "pandas==1.4.4",
                "tensorflow==2.13.0",
                "azureml-core",
                *extra,
            ],
        )
        # Azure ML's other sections: kept, of no effect here
        environment.spark.precache_packages = False
        environment.databricks.pypi_libraries = ["x"]
        environment.r = {"cran_packages": []}
        environment.inferencing_stack_version = "latest"
        return environment

    pins = (
        f"pandas==1.4.4 not met (pandas {pandas_version} installed); "
        f"tensorflow==2.13.0 not met (tensorflow-cpu {tf_version} installed, "
        "which provides tensorflow)"
    )
    environment = env()
    assert environment.spark.precache_packages is False
    assert environment.databricks.pypi_libraries == ["x"]
    assert environment.inferencing_stack_version == "latest"

    # on daskrun's own local cluster: checked here, before it starts; one
    # warning line names each package and both versions, and the step runs
    caplog.set_level(logging.WARNING, logger="daskrun")
    run = run_step(
        tmp_path / "a", ENV_SCRIPT, inputs, environment=environment,
        process_count_per_node=1,
    )  # fmt: skip
    assert run.status == "Completed", run.error
    assert Path(run.output_path or "").read_text().splitlines() == ["pandas 3"] * 3
    warned = [r.getMessage() for r in caplog.records if "Environment" in r.getMessage()]
    assert warned == [
        f"daskrun: Environment 'predict_environment': {pins}; running with the "
        "installed versions (set daskrun.environment.strict: true to refuse the "
        "step instead)"
    ]

    # on a cluster of its own: checked on its workers, warned once too
    caplog.clear()
    run = run_step(
        tmp_path / "b", ENV_SCRIPT, inputs, environment=env(), compute_target=cluster
    )
    assert run.status == "Completed", run.error
    assert len([r for r in caplog.records if "Environment" in r.getMessage()]) == 1

    # strict, or a package not installed at all: refused before any cluster
    # starts, and before any run folder is made
    before = set(runs_dir.iterdir()) if runs_dir.exists() else set()
    with dask.config.set({"daskrun.environment.strict": True}):
        with pytest.raises(JobFailedError) as strict:
            run_step(tmp_path / "c", ENV_SCRIPT, inputs, environment=env())
    assert str(strict.value) == (
        f"Environment 'predict_environment': {pins} on this machine; fix the "
        "workers' environment (pip install 'pandas==1.4.4' 'tensorflow-cpu==2.13.0')"
    )
    with pytest.raises(JobFailedError, match=r"no-such-package-xyz not installed on"):
        run_step(
            tmp_path / "d", ENV_SCRIPT, inputs, environment=env("no-such-package-xyz")
        )
    assert (set(runs_dir.iterdir()) if runs_dir.exists() else set()) == before
    with dask.config.set({"daskrun.environment.strict": "sometimes"}):
        with pytest.raises(daskrun.ConfigError, match="must be true or false"):
            run_step(tmp_path / "e", ENV_SCRIPT, inputs, environment=env())


# Azure ML's per-folder entry script, with mini_batch_context.dataset used
# as the data set it is there
PER_FOLDER_SCRIPT = """\
import os


def init():
    print("Init")


def run(mini_batch, mini_batch_context):
    keys = mini_batch_context.partition_key_value
    dataset = mini_batch_context.dataset
    listed = ";".join(dataset.to_path())
    copied = ";".join(sorted(os.path.basename(p) for p in dataset.download()))
    return [
        f"{keys['user']},{keys['genres']},{os.path.basename(path)},"
        f"{os.path.getsize(path)},{listed},{copied}"
        for path in mini_batch
    ]
"""


def test_partition_format_from_the_datastore_path_and_the_partition_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = _workspace(tmp_path)
    store = ws.get_default_datastore()
    # the sample's folders, uploaded from relative paths as the sample does
    monkeypatch.chdir(tmp_path)
    for genre, size in (("disco", 30), ("piano", 10)):
        (tmp_path / "test_files" / genre).mkdir(parents=True)
        (tmp_path / "test_files" / genre / f"{genre}.wav").write_bytes(b"x" * size)
    layout = [
        ("disco", "user1/winter"),
        ("piano", "user1/fall"),
        ("piano", "user2/fall"),
    ]
    for genre, where in layout:
        store.upload(
            f"test_files/{genre}", f"dataset_partition_test/{where}", overwrite=True,
            show_progress=False,
        )  # fmt: skip
    with pytest.raises(daskrun.ConfigError, match="src_dir='test_files/nope' is not"):
        store.upload("test_files/nope", "x", show_progress=False)

    # the pattern names the folder above the glob's, as Azure ML's do
    files = Dataset.File.from_files(
        path=(store, "dataset_partition_test/*/*/*.wav"),
        partition_format="dataset_partition_test/{user}/{season}/{genres}.wav",
        validate=False,
    )
    assert files.partition_keys == ["user", "season", "genres"]
    found = [values for _, values in files.partition_values()]
    assert found == [
        {"user": "user1", "season": "fall", "genres": "piano"},
        {"user": "user1", "season": "winter", "genres": "disco"},
        {"user": "user2", "season": "fall", "genres": "piano"},
    ]
    # a pattern that starts with a key still matches below the glob's folder
    # only: the folders above never become keys
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "stray.wav").write_text("x")
    with pytest.raises(daskrun.InputError, match="does not match partition_format"):
        Dataset.File.from_files(
            str(tmp_path / "loose"), partition_format="/{u}/{f}.wav"
        )

    script = write_script(tmp_path / "src", PER_FOLDER_SCRIPT, "score.py")
    config = ParallelRunConfig(
        entry_script="score.py",
        source_directory=str(script.parent),
        partition_keys=["user", "genres"],
        error_threshold=0,
        output_action="append_row",
        process_count_per_node=2,
    )
    step = ParallelRunStep(
        "per-folder", config, inputs=[files.as_named_input("audio")],
        output=str(tmp_path / "out"),
    )  # fmt: skip
    run = step.run(workspace=ws)
    assert run.status == "Completed", run.error
    got = Path(run.output_path or "").read_text().splitlines()
    # a plain loop over the partitions: each one's files, and its data set
    # (the input filtered to the partition) lists and downloads those alone
    expected = [
        "user1,disco,disco.wav,30,/disco.wav,disco.wav",
        "user1,piano,piano.wav,10,/piano.wav,piano.wav",
        "user2,piano,piano.wav,10,/piano.wav,piano.wav",
    ]
    assert got == expected


PER_COLUMN_SCRIPT = """\
def init():
    pass


def run(mini_batch, mini_batch_context):
    rows = mini_batch_context.dataset.to_pandas_dataframe()
    assert rows.equals(mini_batch), (rows, mini_batch)
    mini_batch["total"] = mini_batch["amount"].sum()
    return mini_batch
"""


def test_partition_by_again_writes_a_new_version_with_one_progress_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = _workspace(tmp_path)
    store = ws.get_default_datastore()
    frame = pd.DataFrame(
        {
            "region": [["n", "s", "e", "w"][i % 4] for i in range(40)],
            "amount": range(40),
        }
    )
    frame.to_csv(tmp_path / "sales.csv", index=False)
    sales = Dataset.Tabular.from_delimited_files(str(tmp_path / "sales.csv"))

    first = sales.partition_by(["region"], (store, "by_region"), name="by_region")
    bars = capsys.readouterr()
    # one progress bar (tqdm's, here to a file: its last state), no line per
    # partition
    assert "partition_by: 100%" in bars.err and "4/4" in bars.err
    assert bars.out == ""
    second = sales.partition_by(["region"], (store, "by_region"), name="by_region")
    capsys.readouterr()
    assert Dataset.get_by_name(ws, "by_region").version == 2
    assert Dataset.get_by_name(ws, "by_region", version=1).files() == first.files()
    # the second run left the first's files and wrote below a GUID folder
    root = tmp_path / "ws" / "datastore" / "by_region"
    guid = next(p.name for p in root.iterdir() if "=" not in p.name)
    assert str(uuid.UUID(guid)) == guid
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [guid, "region=e", "region=n", "region=s", "region=w"]
    )
    for parts in (first, second):
        back = parts.to_pandas_dataframe().sort_values("amount", ignore_index=True)
        assert back[["amount", "region"]].values.tolist() == (
            frame[["amount", "region"]].values.tolist()
        )

    # the new version runs, partition by partition, with each one's rows
    script = write_script(tmp_path / "src", PER_COLUMN_SCRIPT)
    config = ParallelRunConfig(
        str(script), partition_keys=["region"], error_threshold=0,
        output_action="append_row", process_count_per_node=2,
    )  # fmt: skip
    latest = Dataset.get_by_name(ws, "by_region")
    step = ParallelRunStep(
        "by-region", config, inputs=[latest], output=str(tmp_path / "o")
    )
    run = step.run(workspace=ws)
    assert run.status == "Completed", run.error
    got = Path(run.output_path or "").read_text().splitlines()
    expected = [
        f"{amount} {region} {group['amount'].sum()}"
        for region, group in frame.groupby("region", sort=True)
        for amount in group["amount"]
    ]
    assert got == expected


def test_isolated_rows_are_named_as_users_count_them(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    # rows of 4-6 bytes: mini-batches of "100" bytes hold about 20 rows
    path = tmp_path / "in" / "rows.csv"
    poison_rows(path, 60, {0, 2, 40})
    run = run_step(
        tmp_path, ROWS_SCRIPT, Dataset.Tabular.from_delimited_files(str(path)),
        compute_target=cluster, mini_batch_size="100", error_threshold=3,
        run_max_try=1,
    )  # fmt: skip
    assert run.status == "Completed", run.error
    assert (run.items_succeeded, run.items_failed) == (57, 3)
    failed = pd.read_csv(
        Path(run.logs_dir) / "sys/job_report/failed_items.csv", keep_default_na=False
    ).sort_values(["index", "start"], ignore_index=True)
    described = list(failed["input"])
    # in the mini-batch at the file's start, rows are the file's, from 0 as
    # pandas counts them, one row named as one row
    assert [d.split(" bytes ")[0] for d in described[:2]] == [
        f"row 0 of {path}",
        f"row 2 of {path}",
    ]
    # further on, a row is counted within its mini-batch, which says so
    later, index = described[2], int(failed["index"].iloc[2])
    head, _, cut = later.partition(f" of mini-batch {index}'s rows ({path} bytes ")
    assert head.startswith("row ") and cut.endswith(")"), later
    offset = int(cut.split("-")[0])
    # the rows before that mini-batch's first byte, and the one it names,
    # are the file's row 40
    rows_before = path.read_bytes()[:offset].count(b"\n") - 1  # not the header
    assert rows_before + int(head.split()[1]) == 40


NATIVE_SCRIPT = """\
import os
import sys
import time


def init():
    # as TensorFlow's C++ start-up lines are: straight to descriptor 2
    os.write(2, b"native init line\\n")


def run(mini_batch):
    time.sleep(0.2)  # each worker process gets a mini-batch
    os.write(1, b"native run line\\n")
    os.write(2, b"native run error line\\n")
    print("python stderr line", file=sys.stderr)
    return [os.path.basename(p) for p in mini_batch]
"""


def test_native_output_of_workers_goes_to_the_run_logs(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    make_files(tmp_path / "in", 4)
    run = run_step(
        tmp_path, NATIVE_SCRIPT, Dataset.File.from_files(str(tmp_path / "in")),
        mini_batch_size=1, process_count_per_node=2,
    )  # fmt: skip
    assert run.status == "Completed", run.error
    terminal = capfd.readouterr()  # the worker processes' descriptors too
    assert "native" not in terminal.out + terminal.err
    # Python's own stderr reaches the terminal, as before
    assert terminal.err.count("python stderr line") == 4
    logs = Path(run.logs_dir, "user", "stdout")
    text = "".join(p.read_text() for p in logs.iterdir())
    assert text.count("native init line") == 2  # one per worker process
    assert text.count("native run line") == text.count("native run error line") == 4
