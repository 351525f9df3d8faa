"""Train the MNIST example's model: a tiny Keras CNN on scikit-learn's digits.

The model is trained at setup time, in seconds, on 28×28 images rendered in
memory by `make_data.render_digits` from the 1,347 *training* digits of
`make_data.digit_split`, several random variations of each. Its accuracy is
measured on variations of the 450 *held-out* digits, the digits that
`make_data.make_images` draws the images to score from, so the figure predicts
the accuracy of a scoring run.

The saved model takes raw ``uint8`` images of shape ``(n, 28, 28)`` (it rescales
them itself) and returns ``(n, 10)`` class probabilities.

Run as a script::

    python examples/mnist/train_model.py /tmp/mnist-model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    from .make_data import digit_split, render_digits
except ImportError:  # run as a script: python examples/mnist/train_model.py
    from make_data import digit_split, render_digits  # type: ignore[no-redef]

if TYPE_CHECKING:
    import keras

__all__ = ["MODEL_FILE", "build_model", "train_model"]

MODEL_FILE = "mnist.keras"
METRICS_FILE = "mnist.json"

# Variations of each training digit (1,347 digits) and of each held-out digit.
_TRAIN_COPIES = 4
_TEST_COPIES = 4
_EPOCHS = 6
_BATCH_SIZE = 64
_LEARNING_RATE = 2e-3

logger = logging.getLogger(__name__)


def _import_keras() -> Any:
    # Importing TensorFlow takes seconds: only when a model must be trained.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def build_model() -> keras.Model:
    """Return the untrained CNN: two small convolutions and two dense layers.

    Returns
    -------
    keras.Model
        Takes ``uint8`` or float images of shape ``(n, 28, 28)`` with values
        0–255, returns ``(n, 10)`` probabilities; about 57,000 weights.

    Examples
    --------
    >>> build_model().output_shape
    (None, 10)
    """
    keras = _import_keras()
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28)),
            layers.Rescaling(1.0 / 255),
            layers.Reshape((28, 28, 1)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dropout(0.2),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ],
        name="mnist_cnn",
    )


def _train(seed: int) -> tuple[keras.Model, dict[str, Any]]:
    """Train a model; return it with its held-out accuracy and timings."""
    keras = _import_keras()
    keras.utils.set_random_seed(seed)
    train, held_out = digit_split()
    rng = np.random.default_rng([seed, 10])
    x_train, y_train = render_digits(np.repeat(train, _TRAIN_COPIES), rng)
    x_test, y_test = render_digits(np.repeat(held_out, _TEST_COPIES), rng)

    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=_LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        epochs=_EPOCHS,
        batch_size=_BATCH_SIZE,
        shuffle=True,
        verbose=0,
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=512, verbose=0)
    metrics = {
        "held_out_accuracy": round(float(accuracy), 4),
        "held_out_images": len(y_test),
        "train_images": len(y_train),
        "epochs": _EPOCHS,
        "train_seconds": round(seconds, 2),
        "seed": seed,
    }
    return model, metrics


def train_model(model_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Train the example model and save it as ``model_dir/mnist.keras``.

    Idempotent: returns at once, without importing TensorFlow, when
    ``mnist.keras`` is already there. The model is saved under a temporary name
    and renamed, so an interrupted run never leaves a half-written model. The
    held-out accuracy is logged and saved beside the model in ``mnist.json``.

    Parameters
    ----------
    model_dir : str or os.PathLike
        Folder of the model, created if missing; what ``Model.get_model_path``
        should return for the model name ``"mnist"``.
    seed : int, default 0
        Seed of the training images and of Keras' weight initialisation.

    Returns
    -------
    pathlib.Path
        ``model_dir``.

    Examples
    --------
    >>> import tempfile
    >>> model_dir = train_model(tempfile.mkdtemp())  # doctest: +SKIP
    >>> sorted(p.name for p in model_dir.iterdir())  # doctest: +SKIP
    ['mnist.json', 'mnist.keras']
    """
    model_dir = Path(model_dir)
    target = model_dir / MODEL_FILE
    if target.is_file():
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    model, metrics = _train(seed)
    logger.info(
        "trained %s in %.1f s; held-out accuracy %.2f%% on %d images",
        target,
        metrics["train_seconds"],
        100 * metrics["held_out_accuracy"],
        metrics["held_out_images"],
    )
    (model_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    # Keras insists on the ".keras" suffix, so the temporary name keeps it.
    tmp = model_dir / f".{uuid.uuid4().hex[:8]}.{MODEL_FILE}"
    try:
        model.save(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return model_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python train_model.py MODEL_DIR [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="folder to save mnist.keras to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_dir = train_model(args.model_dir, seed=args.seed)
    metrics_file = model_dir / METRICS_FILE
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    print(f"{model_dir / MODEL_FILE}: {metrics}")


if __name__ == "__main__":
    main()
