"""Entry script of the iris notebook: the predicted variety of each row.

An Azure ML ParallelRunStep entry script: the model's name comes in as an
argument, its path from ``azureml.core.model.Model``, and ``run()`` gets
the rows of a mini-batch as a pandas DataFrame.
"""

import argparse
import pickle

from azureml.core.model import Model
from azureml_user.parallel_run import EntryScript


def init():
    global iris_model

    logger = EntryScript().logger
    logger.info("init() is called.")

    parser = argparse.ArgumentParser(description="Iris model serving")
    parser.add_argument("--model_name", dest="model_name", required=True)
    args, _ = parser.parse_known_args()

    with open(Model.get_model_path(args.model_name), "rb") as model_file:
        iris_model = pickle.load(model_file)


def run(input_data):
    EntryScript().logger.info("run() is called with %d rows.", len(input_data))

    # the four measurements, and the predicted variety beside them
    result = input_data.iloc[:, :4].copy()
    result["variety"] = iris_model.predict(result)
    return result
