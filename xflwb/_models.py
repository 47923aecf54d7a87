"""The small Keras models of the demo, the notebooks and the benchmarks.

Below every front-end (the facade exports ``demo_model``; ``xflwb demo`` builds both), and
light: Keras is imported when a model is built, not when this module is.
"""

from __future__ import annotations

from typing import Any


def demo_model(input_shape: tuple[int, ...] = (8, 8, 1), classes: int = 10) -> Any:
    """A small CNN for 8×8 digits: every layer trains on both platforms."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(classes, activation="softmax", name="probs"),
    ], name="digits_cnn")


def activity_model(input_shape: tuple[int, ...] = (32, 3), classes: int = 6) -> Any:
    """A small 1-D CNN for (32, 3) accelerometer windows (the `activity` dataset)."""
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv1D(16, 5, padding="same", activation="relu", name="conv1"),
        keras.layers.MaxPooling1D(2, name="pool"),
        keras.layers.Conv1D(16, 3, padding="same", activation="relu", name="conv2"),
        keras.layers.GlobalAveragePooling1D(name="gap"),
        keras.layers.Dense(classes, activation="softmax", name="probs"),
    ], name="activity_cnn")
