"""Gradients the TFLite train signature runs faster than TF's own (Flex) gradient kernels.

TF's own gradients of ReLU, max pooling and a convolution's kernel convert to the Flex ops
``ReluGrad``, ``MaxPoolGrad`` and ``Conv2DBackpropFilter``; on a phone (and in TF's
interpreter) these run TF's generic CPU kernels, and ``MaxPoolGrad`` recomputes the pooling
with arg-max bookkeeping: in a profile of the MNIST-sized CNN's train step it took 29 % of
the step, more than the whole forward pass.
While ``xflwb.bridge.tflite`` traces the train signature, eligible Keras layers get twins
here whose *forward* is the same TF op (so ``infer`` and the forward of ``train`` are
unchanged) and whose gradient is written with built-in ops that TFLite runs fast on
same-shaped tensors (no broadcasting: TFLite's broadcasting SELECT_V2 and comparisons are
its slow reference kernels). ReLU and max-pool gradients equal TF's exactly, ties
included: a max-pool window's gradient goes to its first maximum in row-major order, as
TF's does. A stride-1 Conv2D's kernel gradient is a Flex ``Conv2D`` with batch and
channels swapped (equal to TF's up to float32 summation order).

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


def conv_2d(x: Any, kernel: Any, padding: str) -> Any:
    """Stride-1 ``tf.nn.conv2d`` whose kernel gradient is a convolution of the input with
    ``dy``, batch and channels swapped (a Flex ``Conv2D``, with built-in TRANSPOSEs).

    TF's own kernel gradient converts to the Flex op ``Conv2DBackpropFilter``, whose generic
    CPU kernel builds an explicit patch matrix; the swapped convolution contracts over
    batch × rows × columns in TF's convolution kernel, 1.4–2× faster here. The input
    gradient stays TF's (the built-in TRANSPOSE_CONV).
    """
    import tensorflow as tf

    @tf.custom_gradient  # type: ignore[untyped-decorator]  # TF has no stubs
    def twin(x: Any, kernel: Any) -> Any:
        y = tf.nn.conv2d(x, kernel, 1, padding)

        def grad(dy: Any) -> tuple[Any, Any]:
            dx = tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                strides=[1, 1, 1, 1], padding=padding)
            xp = x
            if padding == "SAME":  # TF's SAME at stride 1: k-1 zeros, the extra one after
                kh, kw = kernel.shape[:2]
                xp = tf.pad(x, [[0, 0], [(kh - 1) // 2, kh // 2], [(kw - 1) // 2, kw // 2],
                                [0, 0]])
            dk = tf.nn.conv2d(tf.transpose(xp, [3, 1, 2, 0]),  # (C_in, H, W, batch)
                              tf.transpose(dy, [1, 2, 0, 3]),  # (h, w, batch, C_out)
                              1, "VALID")  # (C_in, kh, kw, C_out)
            return dx, tf.transpose(dk, [1, 2, 0, 3])

        return y, grad

    return twin(x, kernel)


def _conv_padding(layer: Any) -> str | None:
    """"VALID"/"SAME" for a stride-1, undilated, ungrouped channels-last Conv2D; else None."""
    if (type(layer).__name__ != "Conv2D" or tuple(layer.strides) != (1, 1)
            or tuple(layer.dilation_rate) != (1, 1) or getattr(layer, "groups", 1) != 1
            or layer.data_format != "channels_last" or layer.padding not in ("valid", "same")):
        return None
    return str(layer.padding).upper()


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
def builtin_gradients(model: Any, *, convs: bool = True) -> Iterator[Any]:
    """Give ``model``'s ReLUs, non-overlapping max pools and (``convs``) stride-1 Conv2Ds
    their twins while tracing (``convs=False`` lets a benchmark measure the pools alone)."""
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
        padding = _conv_padding(lay) if convs else None
        if padding is not None and "convolution_op" not in vars(lay):
            swapped.append((lay, "convolution_op", None))
            object.__setattr__(lay, "convolution_op", lambda inputs, kernel, _p=padding:
                               conv_2d(inputs, kernel, _p))
        if isinstance(lay, keras.layers.MaxPooling2D) and "call" not in vars(lay):
            k = _pool_size(lay)
            if k is not None:
                swapped.append((lay, "call", None))
                lay.call = lambda inputs, _k=k: max_pool_2d(inputs, _k)
    try:
        yield model
    finally:
        for lay, attr, old in reversed(swapped):
            if old is None:
                vars(lay).pop(attr, None)
            else:
                object.__setattr__(lay, attr, old)
