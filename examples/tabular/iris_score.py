"""Entry script of the tabular example, in the style of ParallelRunStep's
iris sample: ``run()`` receives a DataFrame (a piece of a CSV or Parquet
file) and returns a DataFrame keyed by the input's ``id`` column.
"""

from __future__ import annotations

import argparse

import joblib
import pandas as pd

from daskrun import EntryScript, Model

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def init() -> None:
    """Load the registered model named by ``--model_name``."""
    global iris_model, logger
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_name", dest="model_name", required=True)
    args, _unknown = parser.parse_known_args()
    logger = EntryScript().logger
    model_path = Model.get_model_path(args.model_name)
    iris_model = joblib.load(model_path)
    logger.info("loaded model %s from %s", args.model_name, model_path)


def run(input_data: pd.DataFrame) -> pd.DataFrame:
    """One row out per row in: the key, the prediction and its probability."""
    probabilities = iris_model.predict_proba(input_data[FEATURES])
    result = pd.DataFrame(
        {
            "id": input_data["id"].to_numpy(),
            "species": iris_model.classes_[probabilities.argmax(axis=1)],
            "probability": probabilities.max(axis=1).round(4),
        }
    )
    logger.debug("scored %d rows", len(result))
    return result
