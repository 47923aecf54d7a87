"""Build a training-capable ``.tflite`` with the signatures FedKit's Android library calls.

``train(x, y) -> loss``, ``infer(x) -> logits``, ``parameters() -> a0..aN``,
``restore(a0..aN)``. The Keras model runs inside ``train`` with a Keras optimizer, so the
step has Keras semantics; ``restore`` also resets every optimizer variable (slots and
iteration to zero, learning rate to its value), which both starts each round from zero
optimizer state (as a Core ML update task does) and avoids READ_VARIABLE failures.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xflwb._quiet import quiet
from xflwb.bridge.graph import ExportError, ModelGraph
from xflwb.bridge.optim import SGD, Optimizer


def keras_optimizer(optimizer: Optimizer) -> Any:
    import keras

    if isinstance(optimizer, SGD):
        return keras.optimizers.SGD(learning_rate=optimizer.learning_rate,
                                    momentum=optimizer.momentum)
    return keras.optimizers.Adam(learning_rate=optimizer.learning_rate,
                                 beta_1=optimizer.beta_1, beta_2=optimizer.beta_2,
                                 epsilon=optimizer.epsilon)


def keras_loss(loss: str) -> Any:
    import keras

    if loss == "categorical_crossentropy":
        return keras.losses.CategoricalCrossentropy()
    return keras.losses.MeanSquaredError()


def reset_optimizer(opt: Any, learning_rate: float) -> None:
    """Assign every optimizer variable: slots/iteration to 0, learning rate to its value."""
    import tensorflow as tf

    for v in opt.variables:
        if v.path.endswith("learning_rate"):
            v.assign(tf.constant(learning_rate, dtype=v.dtype))
        else:
            v.assign(tf.zeros(v.shape, dtype=v.dtype))


def _batchnorms(model: Any) -> list[Any]:
    import keras

    return [lay for lay in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(lay, keras.layers.BatchNormalization)]


def batchnorm_inference(model: Any) -> None:
    """Run every BatchNormalization of ``model`` with its moving statistics, also in training.

    xflwb's rule for BatchNorm on phones: Core ML cannot update moving statistics, so on
    every platform BatchNorm normalises with the exported moving mean/variance, which never
    change and never travel; gamma/beta are ordinary weights (trained where the layer is
    trainable). This is Keras' own behaviour for a frozen BatchNorm, applied to all.
    """
    for lay in _batchnorms(model):
        if "call" in vars(lay):
            continue
        cls_call = type(lay).call

        def call(inputs: Any, training: Any = None, mask: Any = None, _lay: Any = lay,
                 _call: Any = cls_call) -> Any:
            return _call(_lay, inputs, training=False, mask=mask)

        lay.call = call


@contextlib.contextmanager
def batchnorm_inference_scope(model: Any) -> Iterator[Any]:
    """``batchnorm_inference`` for the duration of a block (the user's model is restored)."""
    patched = [lay for lay in _batchnorms(model) if "call" not in vars(lay)]
    batchnorm_inference(model)
    try:
        yield model
    finally:
        for lay in patched:
            vars(lay).pop("call", None)


def build_module(model: Any, graph: ModelGraph, loss: str, optimizer: Optimizer) -> Any:
    """A ``tf.Module`` whose four tf.functions are the FedKit signatures."""
    import tensorflow as tf

    opt = keras_optimizer(optimizer)
    opt.build(model.trainable_variables)
    loss_fn = keras_loss(loss)
    lr = float(optimizer.learning_rate)
    x_spec = tf.TensorSpec([None, *graph.input_shape], tf.float32, name="x")
    y_spec = tf.TensorSpec([None, *graph.output_shape], tf.float32, name="y")
    param_specs = [tf.TensorSpec(v.shape, tf.float32, name=f"a{i}")
                   for i, v in enumerate(model.trainable_variables)]

    class FedKitModule(tf.Module):  # type: ignore[misc]  # TensorFlow ships no type stubs
        def __init__(self) -> None:
            super().__init__()
            # Keras 3 variables are not tracked by tf.Module: track the backing tf.Variables
            # so the SavedModel (and TFLite) initialise them with the exported values on load.
            # The model and optimizer themselves are closed over, not attributes: the saver
            # would otherwise walk (and serialise functions of) every Keras layer.
            self._tracked = [v.value for v in [*model.variables, *opt.variables]]

        @tf.function(input_signature=[x_spec, y_spec])  # type: ignore[untyped-decorator]  # TF has no stubs
        def train(self, x: Any, y: Any) -> dict[str, Any]:
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                value = loss_fn(y, pred)
            grads = tape.gradient(value, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return {"loss": value}

        @tf.function(input_signature=[x_spec])  # type: ignore[untyped-decorator]  # TF has no stubs
        def infer(self, x: Any) -> dict[str, Any]:
            return {"logits": model(x, training=False)}

        @tf.function(input_signature=[])  # type: ignore[untyped-decorator]  # TF has no stubs
        def parameters(self) -> dict[str, Any]:
            return {f"a{i}": tf.identity(v.value)
                    for i, v in enumerate(model.trainable_variables)}

        @tf.function(input_signature=param_specs)  # type: ignore[untyped-decorator]  # TF has no stubs
        def restore(self, *arrays: Any) -> dict[str, Any]:
            for v, a in zip(model.trainable_variables, arrays, strict=True):
                v.assign(a)
            reset_optimizer(opt, lr)
            return {f"a{i}": tf.identity(v.value)
                    for i, v in enumerate(model.trainable_variables)}

    return FedKitModule()


def save_saved_model(module: Any, directory: Path) -> Path:
    import tensorflow as tf

    signatures = {name: getattr(module, name).get_concrete_function()
                  for name in ("train", "infer", "parameters", "restore")}
    # No custom gradients: only the converter reads this SavedModel, and it never
    # differentiates what it loads (``train``'s gradients are already in its graph). Saving
    # them traces every op's gradient function again, a third of the save's time; the
    # .tflite trains the same, bit for bit (tests/test_export.py)
    options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
    with quiet():
        tf.saved_model.save(module, str(directory), signatures=signatures, options=options)
    return Path(directory)


def convert_saved_model(directory: Path) -> bytes:
    """TFLite converter with Select TF ops (the gradients need the Flex delegate).

    The converter logs natively (absl ``W0000``/MLIR lines on fd 2, "Importing a function …
    Will likely fail if a gradient is requested" from the SavedModel load): `quiet` captures
    it, and a failed conversion raises ``ExportError`` carrying that log.
    """
    import tensorflow as tf

    with quiet() as captured:
        conv = tf.lite.TFLiteConverter.from_saved_model(str(directory))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                          tf.lite.OpsSet.SELECT_TF_OPS]
        conv.experimental_enable_resource_variables = True
        # The converter calls gc.collect(), which walks every object of the process: in a
        # kernel or a test process with a large heap that is most of a small model's
        # conversion. Frozen objects are left out of collections until unfrozen, so it only
        # looks at what the conversion made; nothing is lost, old cycles wait for the next
        # collection. A process that froze objects itself (a pre-fork server) is left as it
        # is: unfreezing would undo its freeze.
        ours = gc.get_freeze_count() == 0
        if ours:
            gc.freeze()
        try:
            data: bytes = conv.convert()
            return data
        except Exception as exc:
            log = captured.tail()
            raise ExportError(
                f"the TFLite converter failed: {str(exc).strip() or type(exc).__name__}"
                + (f"\nconverter log:\n{log}" if log else "")
                + "\n(xflwb's layer check accepted this model, so this is an xflwb bug: "
                "please report it with this message; verbose=True shows the full log)") from exc
        finally:
            if ours:
                gc.unfreeze()


def build(model: Any, graph: ModelGraph, loss: str, optimizer: Optimizer) -> bytes:
    """Return the ``.tflite`` bytes for ``model``.

    ReLU, max-pool and stride-1 conv-kernel gradients are traced as ``tflite_grads``' twins:
    TF's own convert to slow Flex kernels (the MNIST-sized CNN's step was ~1.7× Keras's).
    """
    from xflwb.bridge.tflite_grads import builtin_gradients

    with batchnorm_inference_scope(model), builtin_gradients(model), \
            tempfile.TemporaryDirectory(prefix="xflwb-sm-") as tmp:
        module = build_module(model, graph, loss, optimizer)
        save_saved_model(module, Path(tmp) / "saved_model")
        return convert_saved_model(Path(tmp) / "saved_model")
