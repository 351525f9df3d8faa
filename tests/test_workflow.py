"""The tutorial's workflow: workspace, datastores, data sets, models,
compute targets, pipelines, resubmission, reuse and run records."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import dask.config
import pandas as pd
import pytest
from distributed import LocalCluster

from daskrun import (
    ComputeTarget,
    ConfigError,
    Dataset,
    DatasetConsumptionConfig,
    Datastore,
    Environment,
    Experiment,
    JobFailedError,
    LocalCompute,
    Model,
    ParallelRunConfig,
    ParallelRunStep,
    Pipeline,
    PipelineData,
    PipelineParameter,
    StepRun,
    Workspace,
)
from daskrun.registry.records import RunRecord

from .helpers import (
    AZURITE_KEY,
    REPO,
    daskrun,
    digit_pipeline,
    make_files,
    make_images,
    make_model,
    poll_for,
    write_script,
)
from .scripts import DIGIT_SCRIPT, SLOW_SCRIPT


def test_the_tutorial_against_azure_blob_storage(
    tmp_path: Path, azurite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = azurite.split("BlobEndpoint=")[1].rstrip(";")
    project = tmp_path / "project"
    write_script(project, DIGIT_SCRIPT, "digit_identification.py")
    Workspace.create(tmp_path / "ws").write_config(project)
    monkeypatch.chdir(project)

    # the workspace
    ws = Workspace.from_config()

    # a compute target
    compute_name = "cpucluster"
    if compute_name in ws.compute_targets:
        compute_target = ws.compute_targets[compute_name]
    else:
        provisioning_config = LocalCompute.provisioning_configuration()
        compute_target = ComputeTarget.create(ws, compute_name, provisioning_config)
        compute_target.wait_for_completion(show_output=True)

    # a datastore with sample images (uploaded to Azurite first), and the
    # workspace's default datastore on Blob Storage too
    mnist_blob = Datastore.register_azure_blob_container(
        ws,
        datastore_name="mnist_datastore",
        container_name="sampledata",
        account_name="devstoreaccount1",
        account_key=AZURITE_KEY,
        endpoint=endpoint,
        create_if_not_exists=True,
        overwrite=True,
    )
    make_images(tmp_path / "images", 40)
    mnist_blob.upload(tmp_path / "images", "mnist", overwrite=True)
    Datastore.register_azure_blob_container(
        ws,
        datastore_name="workspaceblobstore",
        container_name="azureml-blobstore",
        account_name="devstoreaccount1",
        connection_string=azurite,
        create_if_not_exists=True,
    )
    ws.set_default_datastore("workspaceblobstore")
    def_data_store = ws.get_default_datastore()

    # the input data set, registered, and used through a PipelineParameter
    path_on_datastore = mnist_blob.path("mnist/")
    input_mnist_ds = Dataset.File.from_files(path=path_on_datastore, validate=False)
    registered = input_mnist_ds.register(ws, "mnist_images", create_new_version=True)
    input_mnist_ds = Dataset.get_by_name(ws, "mnist_images")
    assert input_mnist_ds.version == registered.version
    pipeline_param = PipelineParameter(name="mnist_param", default_value=input_mnist_ds)
    input_mnist_ds_consumption = DatasetConsumptionConfig(
        "minist_param_config", pipeline_param
    ).as_mount()
    output_dir = PipelineData(name="inferences", datastore=def_data_store)

    # the model, stored on Blob Storage: workers fetch it
    model = Model.register(
        model_path=make_model(tmp_path / "models", offset=100),
        model_name="mnist",
        tags={"pretrained": "mnist"},
        description="Mnist trained tensorflow model",
        workspace=ws,
    )
    assert model.url.startswith("abfs://azureml-blobstore/models/mnist/")

    batch_env = Environment(
        name="batch_environment",
        pip_packages=["pandas", "adlfs"],
        environment_variables={"INIT_MARKERS": str(tmp_path)},
    )
    parallel_run_config = ParallelRunConfig(
        source_directory=".",
        entry_script="digit_identification.py",
        mini_batch_size=PipelineParameter(name="batch_size_param", default_value="5"),
        error_threshold=10,
        output_action="append_row",
        append_row_file_name="mnist_outputs.txt",
        environment=batch_env,
        compute_target=compute_target,
        process_count_per_node=PipelineParameter(
            name="process_count_param", default_value=2
        ),
        node_count=1,
    )
    parallelrun_step = ParallelRunStep(
        name="predict-digits-mnist",
        parallel_run_config=parallel_run_config,
        inputs=[input_mnist_ds_consumption],
        output=output_dir,
        allow_reuse=True,
    )
    pipeline = Pipeline(workspace=ws, steps=[parallelrun_step])
    experiment = Experiment(ws, "digit_identification")
    pipeline_run = experiment.submit(pipeline)
    assert pipeline_run.wait_for_completion(show_output=True) == "Completed"

    batch_run = pipeline_run.find_step_run(parallelrun_step.name)[0]
    assert (batch_run.mini_batches_total, batch_run.items_succeeded) == (8, 40)
    assert batch_run.parameters["batch_size_param"] == "5"
    assert len(list(tmp_path.glob("[0-9]*-[0-9]*"))) == 2  # init() per process

    # resubmit with one image and new parameters
    path_on_datastore = mnist_blob.path("mnist/0.png")
    single_image_ds = Dataset.File.from_files(path=path_on_datastore, validate=False)
    pipeline_run_2 = experiment.submit(
        pipeline,
        pipeline_parameters={
            "mnist_param": single_image_ds,
            "batch_size_param": "1",
            "process_count_param": 1,
        },
    )
    pipeline_run_2.wait_for_completion(show_output=True)

    # view the results
    for run, rows in ((pipeline_run, 40), (pipeline_run_2, 1)):
        batch_run = run.find_step_run(parallelrun_step.name)[0]
        batch_output = batch_run.get_output_data(output_dir.name)
        target_dir = tempfile.mkdtemp()
        batch_output.download(local_path=target_dir)
        result_file = os.path.join(
            target_dir,
            batch_output.path_on_datastore,
            parallel_run_config.append_row_file_name,
        )
        df = pd.read_csv(result_file, delimiter=":", header=None)
        df.columns = ["Filename", "Prediction"]
        assert df.shape[0] == rows
        expected = {f"{i}.png": 100 + i % 10 for i in range(40)}
        assert all(
            expected[f] == p for f, p in zip(df.Filename, df.Prediction, strict=True)
        )
    assert batch_run.parameters == {
        "mnist_param": repr(single_image_ds),
        "batch_size_param": "1",
        "process_count_param": 1,
    }


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace.create(tmp_path / "ws")


def test_bad_resubmissions_fail_clearly(
    ws: Workspace, tmp_path: Path, cluster: LocalCluster
) -> None:
    make_images(tmp_path / "images", 3)
    pipeline, _ = digit_pipeline(ws, tmp_path, cluster, tmp_path / "images")
    experiment = Experiment(ws, "digits")
    with pytest.raises(ConfigError, match="unknown pipeline parameter 'batch_sise'"):
        experiment.submit(pipeline, pipeline_parameters={"batch_sise": 1})
    with pytest.raises(
        ConfigError, match="data set 'no-such-images' is not registered"
    ):
        experiment.submit(
            pipeline, pipeline_parameters={"mnist_param": "no-such-images"}
        )
    with pytest.raises(
        ConfigError, match="data set 'no-such-images' is not registered"
    ):
        Dataset.get_by_name(ws, "no-such-images")
    with pytest.raises(ConfigError, match="batch_size_param|mini_batch_size"):
        experiment.submit(pipeline, pipeline_parameters={"batch_size_param": "five"})
    assert not [r for r in ws.runs_dir.glob("predict_*")]  # nothing ran


def test_wrong_key_fails_fast_without_showing_it(
    ws: Workspace, tmp_path: Path, cluster: LocalCluster, azurite: str
) -> None:
    endpoint = azurite.split("BlobEndpoint=")[1].rstrip(";")
    good = Datastore.register_azure_blob_container(
        ws,
        "good",
        "keytest",
        "devstoreaccount1",
        account_key=AZURITE_KEY,
        endpoint=endpoint,
        create_if_not_exists=True,
    )
    make_images(tmp_path / "images", 3)
    good.upload(tmp_path / "images", "imgs")
    wrong_key = "WRONG" + AZURITE_KEY[5:]
    for name, options in (
        ("wrongkey", {"account_key": wrong_key, "endpoint": endpoint}),
        # nothing listens there: the SDK would retry for minutes
        (
            "deadport",
            {
                "account_key": wrong_key,
                "endpoint": "http://127.0.0.1:9/devstoreaccount1",
            },
        ),
    ):
        bad = Datastore.register_azure_blob_container(
            ws,
            name,
            "keytest",
            "devstoreaccount1",
            **options,  # type: ignore[arg-type]
        )
        assert wrong_key not in repr(bad)
        pipeline, step = digit_pipeline(ws, tmp_path, cluster, tmp_path / "images")
        ds = Dataset.File.from_files(bad.path("imgs/"), validate=False)
        started = time.monotonic()
        with dask.config.set({"daskrun.storage-timeout": 5}):
            run = Experiment(ws, "digits").submit(
                pipeline, pipeline_parameters={"mnist_param": ds}
            )
            with pytest.raises(JobFailedError) as err:
                run.wait_for_completion()
        assert time.monotonic() - started < 30
        message = str(err.value)
        assert f"datastore {name!r}" in message
        assert wrong_key not in message and AZURITE_KEY not in message
        assert run.get_status() == "Failed"
    # the secrets file is the owner's alone; nothing else holds the key
    secrets = ws.path / "secrets" / "wrongkey.json"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert stat.S_IMODE(secrets.parent.stat().st_mode) == 0o700
    for path in ws.path.rglob("*"):
        if path.is_file() and path.parent.name != "secrets":
            data = path.read_bytes()
            assert wrong_key.encode() not in data, path
            assert AZURITE_KEY.encode() not in data, path


def test_unchanged_step_is_reused(
    ws: Workspace, tmp_path: Path, cluster: LocalCluster
) -> None:
    images = make_images(tmp_path / "images", 12)
    pipeline, step = digit_pipeline(ws, tmp_path, cluster, tmp_path / "images")
    experiment = Experiment(ws, "digits")
    markers = tmp_path / "markers"

    def submit() -> tuple[str, str]:
        run = experiment.submit(pipeline)
        run.wait_for_completion()
        (step_run,) = run.find_step_run("predict")
        target = step_run.get_output_data("inferences").download(tmp_path / run.id)
        text = (Path(target) / "parallel_run_step.txt").read_text()
        return step_run.reused_from or "", text

    first_from, first = submit()
    inits = len(list(markers.iterdir()))
    assert first_from == "" and inits >= 1
    again_from, again = submit()
    assert again_from and again == first
    assert len(list(markers.iterdir())) == inits  # no worker task started

    os.utime(images[3], ns=(time.time_ns(), time.time_ns() + 10**9))
    touched_from, touched = submit()
    assert touched_from == "" and touched == first
    assert len(list(markers.iterdir())) > inits
    inits = len(list(markers.iterdir()))

    script = tmp_path / "src" / "digit_identification.py"
    os.utime(script, (time.time() + 5, time.time() + 5))
    assert submit()[0] == ""
    assert len(list(markers.iterdir())) > inits
    inits = len(list(markers.iterdir()))

    pipeline, _ = digit_pipeline(
        ws, tmp_path, cluster, tmp_path / "images", allow_reuse=False
    )
    assert submit()[0] == ""


def test_two_steps_pass_pipeline_data(
    ws: Workspace, tmp_path: Path, cluster: LocalCluster
) -> None:
    make_images(tmp_path / "images", 10)
    write_script(
        tmp_path / "src2",
        """
        def init():
            pass

        def run(mini_batch):
            # each input is a results file of the first step
            return [f"{len(open(p).read().splitlines())} lines" for p in mini_batch]
        """,
        "count.py",
    )
    first_pipeline, first = digit_pipeline(ws, tmp_path, cluster, tmp_path / "images")
    second = ParallelRunStep(
        "count-lines",
        ParallelRunConfig(
            source_directory=str(tmp_path / "src2"),
            entry_script="count.py",
            output_action="append_row",
            compute_target=cluster,
        ),
        inputs=[first.output_data],
        output=PipelineData("counts"),
    )
    # listed out of order: the pipeline runs the writer first
    run = Experiment(ws, "two-steps").submit(Pipeline(ws, [second, first]))
    run.wait_for_completion()
    steps = run.get_steps()
    assert [s.name for s in steps] == ["predict", "count-lines"]
    target = steps[1].get_output_data("counts").download(tmp_path / "dl")
    assert (Path(target) / "parallel_run_step.txt").read_text() == "10 lines\n"
    with pytest.raises(ConfigError, match="PipelineData 'inferences' that no step"):
        Pipeline(ws, [second])


def test_records_outlive_the_process(
    ws: Workspace, tmp_path: Path, cluster: LocalCluster
) -> None:
    make_images(tmp_path / "images", 6)
    pipeline, _ = digit_pipeline(ws, tmp_path, cluster, tmp_path / "images")
    run = Experiment(ws, "digits").submit(
        pipeline, pipeline_parameters={"batch_size_param": 4}
    )
    run.wait_for_completion()
    code = textwrap.dedent(
        f"""
        import json
        from daskrun import PipelineRun, Workspace
        ws = Workspace({str(ws.path)!r})
        run = PipelineRun.get(ws, {run.id!r})
        print(json.dumps(run.get_details()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    details = json.loads(out)
    assert details["status"] == "Completed"
    assert details["parameters"] == {"batch_size_param": 4}
    (step,) = details["steps"]
    assert (step["status"], step["items_succeeded"], step["mini_batches_total"]) == (
        "Completed",
        6,
        2,
    )
    assert step["output_path"].endswith("inferences/parallel_run_step.txt")

    listing = daskrun(
        "runs", "list", "--workspace", str(ws.path), cwd=tmp_path, runs=tmp_path
    )
    assert listing.returncode == 0, listing.stderr
    assert run.id in listing.stdout and step["run_id"] in listing.stdout
    assert "6/6" in listing.stdout
    shown = daskrun("runs", "show", step["run_id"], cwd=ws.path, runs=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "status: Completed" in shown.stdout
    assert "items_succeeded: 6" in shown.stdout
    assert "batch_size_param: 4" in shown.stdout
    assert step["output_path"] in shown.stdout
    missing = daskrun("runs", "show", "nope", cwd=ws.path, runs=tmp_path)
    assert missing.returncode == 2 and "run 'nope' not found" in missing.stderr


CONCURRENT = """
import sys
from daskrun import *
from tests.helpers import digit_pipeline, make_images

if __name__ == "__main__":
    ws = Workspace(sys.argv[1])
    tmp = __import__("pathlib").Path(sys.argv[2])
    for i in range(5):
        Dataset.File.from_files(str(tmp / "images")).register(
            ws, "shared", create_new_version=True
        )
    run = Experiment(ws, "concurrent").submit(
        Pipeline(
            ws, [digit_pipeline(ws, tmp, None, tmp / "images", allow_reuse=False)[1]]
        )
    )
    print(run.wait_for_completion())
"""


def test_two_processes_share_a_workspace(ws: Workspace, tmp_path: Path) -> None:
    script = tmp_path / "share_workspace.py"
    script.write_text(CONCURRENT)
    procs = []
    for n in range(2):
        own = tmp_path / f"p{n}"
        make_images(own / "images", 4)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(ws.path), str(own)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
            )
        )
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert out.strip() == "Completed"
    with sqlite3.connect(ws.path / "workspace.db") as db:
        versions = [r[0] for r in db.execute("SELECT version FROM datasets ORDER BY 1")]
    assert versions == list(range(1, 11))
    assert Dataset.get_by_name(ws, "shared").version == 10
    kinds = [r.type for r in RunRecord.find(ws.runs_dir)]
    assert sorted(kinds) == ["pipeline", "pipeline", "step", "step"]


def test_environment_is_checked_before_the_job(
    ws: Workspace, tmp_path: Path, cluster: LocalCluster
) -> None:
    make_images(tmp_path / "images", 3)
    env = Environment("needs-more", pip_packages=["pandas>=1", "no-such-package-xyz"])
    pipeline, _ = digit_pipeline(
        ws, tmp_path, cluster, tmp_path / "images", environment=env
    )
    run = Experiment(ws, "env").submit(pipeline)
    with pytest.raises(
        JobFailedError, match="no-such-package-xyz not installed on worker"
    ):
        run.wait_for_completion()
    assert not list((tmp_path / "markers").iterdir())  # init() never ran
    with pytest.raises(ConfigError, match="not a requirement"):
        Environment("bad", pip_packages=["pandas >>> 1"])


def test_cancel_then_resume(
    ws: Workspace, tmp_path: Path, cluster: LocalCluster
) -> None:
    files = make_files(tmp_path / "in", 60)
    write_script(tmp_path / "slow", SLOW_SCRIPT)
    step = ParallelRunStep(
        "slow-step",
        ParallelRunConfig(
            source_directory=str(tmp_path / "slow"),
            entry_script="score.py",
            mini_batch_size=1,
            compute_target=cluster,
        ),
        inputs=[Dataset.File.from_files(str(tmp_path / "in"))],
        output=PipelineData("names"),
    )
    run = Experiment(ws, "cancel").submit(Pipeline(ws, [step]))
    # cancel once a mini-batch is in the job report (60 take 6 s at least)
    poll_for(
        lambda: _report_rows(run.get_steps()),
        timeout=120,
        what="a mini-batch in the job report",
    )
    run.cancel()
    assert run.wait_for_completion(raise_on_error=False) == "Canceled"
    (step_run,) = run.get_steps()
    assert step_run.status == "Canceled"
    kept = _report_rows([step_run])
    assert 1 <= len(kept) < len(files), len(kept)
    resumed = step_run.resume()
    assert resumed.status == "Completed"
    assert Path(resumed.output_path or "").read_text().splitlines() == [
        p.name for p in files
    ]
    # what finished before the cancel was not run again
    rows = _report_rows([resumed])
    assert sorted(int(r["index"]) for r in rows) == list(range(len(files)))
    assert [r for r in rows if r["index"] in {k["index"] for k in kept}] == kept


def _report_rows(steps: list[StepRun]) -> list[dict[str, str]]:
    """The rows of a step run's job report so far (none before it starts)."""
    if not steps:
        return []
    path = Path(steps[0].logs_dir) / "sys/job_report/processed_mini-batches.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        # a row being written may be cut short: its last fields are None
        return [row for row in csv.DictReader(f) if row.get("error") is not None]


def test_workspace_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a daskrun workspace"):
        Workspace(tmp_path)
    with pytest.raises(ConfigError, match="no daskrun workspace in"):
        Workspace.from_config(tmp_path)
    ws = Workspace.create(tmp_path / "ws")
    assert Workspace.from_config(tmp_path / "ws") == ws
    with pytest.raises(ConfigError, match="datastore 'nope' is not registered"):
        Datastore.get(ws, "nope")
    with pytest.raises(ConfigError, match="model 'nope' is not registered"):
        Model(ws, "nope")
    with pytest.raises(ConfigError, match="container_name='Bad_Name'"):
        Datastore.register_azure_blob_container(ws, "x", "Bad_Name", "acct")
    with pytest.raises(ConfigError, match="already registered"):
        Datastore.register_local(ws, "workspacestore", tmp_path)
    m1 = Model.register(ws, make_model(tmp_path / "m"), "toy")
    m2 = Model.register(ws, make_model(tmp_path / "m", 3), "toy")
    assert (m1.version, m2.version, Model(ws, "toy").version) == (1, 2, 2)
    path = Model.get_model_path("toy", version=1, _workspace=ws)
    assert Path(path, "weights.txt").read_text() == "0"
