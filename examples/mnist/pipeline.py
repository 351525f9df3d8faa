"""The ParallelRunStep MNIST tutorial, on daskrun's embedded default.

Every step of the Azure tutorial, in its order: a workspace, a compute target,
a datastore with the images, the default datastore for the output, a file
data set behind a ``PipelineParameter``, a registered model, an environment,
a ``ParallelRunConfig`` with ``PipelineParameter``s, the step, the pipeline,
submission and live output, resubmission with a single image and new
parameters, and the results read back with pandas. ``daskrun demo`` runs
this file.

The images are MNIST-like PNGs made from scikit-learn's shipped digits
(``make_data.py``) and the model is a small Keras CNN trained from other
digits at set-up (``train_model.py``): nothing is downloaded. A second run
reuses the images, the model and, since nothing changed, the first step's
output.

Run it::

    python examples/mnist/pipeline.py --dir daskrun-demo --images 10000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from daskrun import (
    ComputeTarget,
    Dataset,
    DatasetConsumptionConfig,
    Datastore,
    Environment,
    Experiment,
    LocalCompute,
    Model,
    ParallelRunConfig,
    ParallelRunStep,
    Pipeline,
    PipelineData,
    PipelineParameter,
    Workspace,
)

HERE = Path(__file__).resolve().parent


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="daskrun-demo", help="workspace and data")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--batch-size", default="100", help="images per mini-batch")
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    sys.path.insert(0, str(HERE))
    from make_data import make_images  # the example's own modules
    from train_model import train_model

    started = time.perf_counter()

    # --- set up: the workspace, and a compute target ------------------------
    ws = Workspace.create(root / "workspace")
    compute_name = "cpu-cluster"
    if compute_name in ws.compute_targets:
        compute_target = ws.compute_targets[compute_name]
        print(f"found compute target. just use it. {compute_name}")
    else:
        print("creating a new compute target...")
        provisioning_config = LocalCompute.provisioning_configuration()
        compute_target = ComputeTarget.create(ws, compute_name, provisioning_config)
        compute_target.wait_for_completion(show_output=True)

    # --- inputs and output: a datastore with the images, the default one ---
    images = make_images(root / "data" / "mnist", count=args.images)
    mnist_store = Datastore.register_local(
        ws, datastore_name="mnist_datastore", path=root / "data", overwrite=True
    )
    def_data_store = ws.get_default_datastore()

    path_on_datastore = mnist_store.path("mnist/*.png")
    input_mnist_ds = Dataset.File.from_files(path=path_on_datastore, validate=False)
    pipeline_param = PipelineParameter(name="mnist_param", default_value=input_mnist_ds)
    input_mnist_ds_consumption = DatasetConsumptionConfig(
        "minist_param_config", pipeline_param
    ).as_mount()
    output_dir = PipelineData(name="inferences", datastore=def_data_store)

    # --- the model: trained here once, registered in the workspace ---------
    if "mnist" in ws.models:
        model = ws.models["mnist"]
        print(f"found model {model.name} version {model.version}")
    else:
        model_dir = train_model(root / "models")
        model = Model.register(
            model_path=model_dir,
            model_name="mnist",
            tags={"pretrained": "mnist"},
            description="Mnist trained tensorflow model",
            workspace=ws,
        )
        print(f"registered model {model.name} version {model.version}")

    # --- the step: environment, config with parameters, pipeline -----------
    batch_env = Environment(
        name="batch_environment",
        pip_packages=["tensorflow-cpu", "pillow"],
        environment_variables={"TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    parallel_run_config = ParallelRunConfig(
        source_directory=str(HERE),
        entry_script="digit_identification.py",
        mini_batch_size=PipelineParameter(
            name="batch_size_param", default_value=args.batch_size
        ),
        error_threshold=10,
        output_action="append_row",
        append_row_file_name="mnist_outputs.txt",
        environment=batch_env,
        compute_target=compute_target,
        process_count_per_node=PipelineParameter(
            name="process_count_param", default_value=args.processes
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

    # --- submit and watch ----------------------------------------------------
    pipeline_run = experiment.submit(pipeline)
    pipeline_run.wait_for_completion(show_output=True)

    # --- resubmit with one image and new parameters -------------------------
    path_on_datastore = mnist_store.path("mnist/0.png")
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

    # --- view the results ----------------------------------------------------
    labels = pd.read_csv(images / "labels.csv").set_index("file")["label"]
    for run, title in ((pipeline_run, "all images"), (pipeline_run_2, "one image")):
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
        accuracy = (df.Prediction.to_numpy() == labels[df.Filename].to_numpy()).mean()
        print(f"\n{title}: prediction has {df.shape[0]} rows")
        print(df.head(10).to_string(index=False))
        print(f"accuracy: {accuracy:.1%} of {df.shape[0]} images")
        print(f"output: {batch_run.output_path}")
        print(f"logs: {batch_run.logs_dir}")
        if batch_run.reused_from:
            print(f"(reused the output of run {batch_run.reused_from})")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
