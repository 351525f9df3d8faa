"""Entry script of the MNIST example: identify the digit in each PNG image.

The Azure ML tutorial's ``digit_identification.py``, for Keras 3: ``init()`` loads
the registered model ``"mnist"`` once per worker process; ``run(mini_batch)``
reads the mini-batch's images, predicts them all in one call and returns one
``"<file name>: <digit>"`` line per image, in input order.

The work is done by `load` and `predict`, which need no daskrun, so the model can
be tried in a plain Python session::

    >>> model = load("/tmp/mnist-model")  # doctest: +SKIP
    >>> predict(model, ["/tmp/mnist-images/0.png"])  # doctest: +SKIP
    ['0.png: 9']

Importing this script imports TensorFlow, which takes seconds and about 0.7 GB
of memory per process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

# Set before TensorFlow is imported: it reads the variable once, at import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

MODEL_NAME = "mnist"
MODEL_FILE = "mnist.keras"
IMAGE_SHAPE = (28, 28)

logger = logging.getLogger(__name__)

model: keras.Model | None = None


def _limit_threads() -> None:
    """Give TensorFlow one thread per pool.

    Several worker processes share the machine's cores; TensorFlow's default of
    one thread per core in each process only makes them fight. The setting must
    come before TensorFlow starts its runtime, so later calls leave it as is.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # the runtime already started in this process, e.g. a second init()


def load(model_dir: str | os.PathLike[str]) -> keras.Model:
    """Load the model saved by ``train_model.py`` from its folder.

    Parameters
    ----------
    model_dir : str or os.PathLike
        Folder that holds ``mnist.keras``.

    Returns
    -------
    keras.Model
        Takes ``uint8`` images of shape ``(n, 28, 28)``, returns ``(n, 10)``
        probabilities.
    """
    _limit_threads()
    path = os.path.join(model_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {MODEL_FILE} in model_dir={str(model_dir)!r}; make one with "
            f"'python examples/mnist/train_model.py {model_dir}'"
        )
    return keras.models.load_model(path)


def _read_image(path: str | os.PathLike[str]) -> np.ndarray:
    with Image.open(path) as image:
        if image.mode != "L":
            image = image.convert("L")
        array = np.asarray(image)
    if array.shape != IMAGE_SHAPE:
        raise ValueError(
            f"image {os.fspath(path)!r} is {array.shape[1]}×{array.shape[0]} pixels; "
            "the model reads 28×28 grayscale images like MNIST's"
        )
    return array


def predict(
    model: keras.Model,
    paths: Sequence[str | os.PathLike[str]],
    skip_unreadable: bool = False,
) -> list[str]:
    """Identify the digit in each image, all images in one model call.

    Parameters
    ----------
    model : keras.Model
        As returned by `load`.
    paths : sequence of str or os.PathLike
        Local paths of 28×28 grayscale PNG images.
    skip_unreadable : bool, default False
        Leave out, with a warning, the files that are not 28×28 images (such as
        a ``labels.csv`` among the images) instead of raising.

    Returns
    -------
    list of str
        ``"<file name>: <digit>"`` for each image, in the order of ``paths``.

    Raises
    ------
    PIL.UnidentifiedImageError
        If a file is not an image, unless ``skip_unreadable``.
    ValueError
        If an image is not 28×28 pixels, unless ``skip_unreadable``.
    """
    kept: list[str | os.PathLike[str]] = []
    images: list[np.ndarray] = []
    for path in paths:
        try:
            images.append(_read_image(path))
        except (UnidentifiedImageError, ValueError) as error:
            if not skip_unreadable:
                raise
            logger.warning("skipped %s: %s", os.fspath(path), error)
            continue
        kept.append(path)
    if not images:
        return []
    # predict_on_batch() runs one compiled call; model.predict() sets up a
    # tf.data pipeline per call, ten times slower for 100 images.
    probabilities = np.asarray(model.predict_on_batch(np.stack(images)))
    digits = probabilities.argmax(axis=1)
    return [
        f"{os.path.basename(path)}: {digit}"
        for path, digit in zip(kept, digits.tolist(), strict=True)
    ]


def init() -> None:
    """Load the registered model ``"mnist"`` once per worker process."""
    global model
    # Imported here so that load() and predict() work without daskrun.
    from daskrun import Model

    model_path = Model.get_model_path(MODEL_NAME)
    model = load(model_path)


def run(mini_batch: list[str]) -> list[str]:
    """Identify the digit in each image of a mini-batch of local PNG paths.

    A file that is not a 28×28 image gets no line, and so counts as one failed
    item, as ParallelRunStep counts inputs that ``run`` returns nothing for.
    """
    if model is None:
        raise RuntimeError("run() called before init() loaded the model")
    return predict(model, mini_batch, skip_unreadable=True)
