"""Gradients the TFLite train signature runs in built-in kernels instead of Flex (TF) kernels.

TF's own gradients of ReLU and max pooling convert to the Flex ops ``ReluGrad`` and
``MaxPoolGrad``; on a phone (and in TF's interpreter) these run TF's generic CPU kernels,
and ``MaxPoolGrad`` recomputes the pooling with arg-max bookkeeping: in a profile of the
MNIST-sized CNN's train step it took 29 % of the step, more than the whole forward pass.
While ``xflwb.bridge.tflite`` traces the train signature, eligible Keras layers get twins
here whose *forward* is the same TF op (so ``infer`` and the forward of ``train`` are
unchanged) and whose gradient is written with built-in ops that TFLite runs fast on
same-shaped tensors (no broadcasting: TFLite's broadcasting SELECT_V2 and comparisons are
its slow reference kernels). Results equal TF's gradients exactly, ties included: a
max-pool window's gradient goes to its first maximum in row-major order, as TF's does.

Only the trace is affected; the user's model is restored when the scope ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

#: layer classes whose ``activation`` attribute is applied to their output in ``call``
_ACTIVATION_LAYERS = ("Dense", "Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D",
                      "Activation")


def relu(x: Any) -> Any:
    """``tf.nn.relu`` whose gradient is ``dy * (y > 0)`` in built-in GREATER, CAST, MUL."""
    import tensorflow as tf

    @tf.custom_gradient  # type: ignore[untyped-decorator]  # TF has no stubs
    def twin(x: Any) -> Any:
        y = tf.nn.relu(x)

        def grad(dy: Any) -> Any:
            # y > zeros_like(y), not y > 0: a scalar operand makes TFLite broadcast (slow)
            return dy * tf.cast(tf.greater(y, tf.zeros_like(y)), dy.dtype)

        return y, grad

    return twin(x)


def max_pool_2d(x: Any, k: int) -> Any:
    """Non-overlapping k×k max pooling (stride k, VALID) of an NHWC tensor.

    The gradient sends each window's ``dy`` to its first maximum: the window's k·k values
    become k·k channel blocks (SPACE_TO_DEPTH), each compared with the pooled value in
    turn; a block takes what is left of ``dy`` where it equals the maximum, and what it
    took is subtracted (exactly: it is all or nothing) before the next block looks.
    """
    import tensorflow as tf

    @tf.custom_gradient  # type: ignore[untyped-decorator]  # TF has no stubs
    def twin(x: Any) -> Any:
        y = tf.nn.max_pool2d(x, k, k, "VALID")

        def grad(dy: Any) -> Any:
            rows, cols, ch = x.shape[1:]
            h, w = rows // k, cols // k
            cropped = rows != h * k or cols != w * k
            xc = x[:, :h * k, :w * k, :] if cropped else x
            blocks = tf.unstack(tf.reshape(tf.nn.space_to_depth(xc, k), [-1, k * k, ch]),
                                axis=1)
            top = tf.reshape(y, [-1, ch])
            left = tf.reshape(dy, [-1, ch])
            taken = []
            for i, block in enumerate(blocks):
                took = left * tf.cast(tf.equal(block, top), left.dtype)
                taken.append(took)
                if i + 1 < len(blocks):
                    left = left - took
            dx = tf.nn.depth_to_space(tf.reshape(tf.stack(taken, axis=1),
                                                 [-1, h, w, k * k * ch]), k)
            if cropped:  # the rows/columns VALID pooling never read get no gradient
                dx = tf.pad(dx, [[0, 0], [0, rows - h * k], [0, cols - w * k], [0, 0]])
            return dx

        return y, grad

    return twin(x)


def _pool_size(layer: Any) -> int | None:
    """k when ``layer`` is a k×k, stride-k, channels-last MaxPooling2D that reads whole
    windows only (VALID, or SAME on sizes k divides); else None (TF's gradient stays)."""
    pool, strides = tuple(layer.pool_size), tuple(layer.strides)
    if len(set(pool)) != 1 or strides != pool or layer.data_format != "channels_last":
        return None
    k = int(pool[0])
    shape = layer.input.shape if _has_input(layer) else None
    if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None:
        return None
    if layer.padding == "same" and (shape[1] % k or shape[2] % k):
        return None
    return k if k > 1 else None


def _has_input(layer: Any) -> bool:
    try:
        return layer.input is not None
    except (AttributeError, ValueError):  # a layer used more than once, or never built
        return False


@contextlib.contextmanager
def builtin_gradients(model: Any) -> Iterator[Any]:
    """Give ``model``'s ReLUs and non-overlapping max pools their twins while tracing."""
    import keras

    relu_fn = keras.activations.relu
    swapped: list[tuple[Any, str, Any]] = []
    for lay in model._flatten_layers(include_self=False, recursive=True):
        cls = type(lay).__name__
        if cls in _ACTIVATION_LAYERS and getattr(lay, "activation", None) is relu_fn:
            swapped.append((lay, "activation", lay.activation))
            object.__setattr__(lay, "activation", relu)
        elif isinstance(lay, keras.layers.ReLU) and "call" not in vars(lay) and (
                lay.max_value is None and not lay.negative_slope and not lay.threshold):
            swapped.append((lay, "call", None))
            lay.call = relu
        elif isinstance(lay, keras.layers.MaxPooling2D) and "call" not in vars(lay):
            k = _pool_size(lay)
            if k is not None:
                swapped.append((lay, "call", None))
                lay.call = lambda inputs, _k=k: max_pool_2d(inputs, _k)
    try:
        yield model
    finally:
        for lay, attr, old in reversed(swapped):
            if attr == "call":
                vars(lay).pop("call", None)
            else:
                object.__setattr__(lay, attr, old)
