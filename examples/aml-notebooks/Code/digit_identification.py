"""Entry script of the MNIST-style notebook: each image's most likely digit.

Written as an Azure ML ParallelRunStep entry script: the model comes from
``azureml.core.Model``, ``run()`` returns one line per image.
"""

import os

import numpy as np
import tensorflow as tf
from azureml.core import Model
from PIL import Image


def init():
    global g_model

    # the registered model folder holds the Keras model the notebook saved
    model_path = Model.get_model_path("mnist-prs")
    g_model = tf.keras.models.load_model(os.path.join(model_path, "mnist.keras"))


def run(mini_batch):
    print(f"run method start: {__file__}, run({mini_batch})")
    result_list = []
    for image in mini_batch:
        # a 28x28 grey image, as the model was trained on
        pixels = np.array(Image.open(image)).reshape((1, 28, 28))
        scores = g_model(pixels, training=False).numpy()
        result_list.append(f"{os.path.basename(image)}: {np.argmax(scores)}")
    return result_list
