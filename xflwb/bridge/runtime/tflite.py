"""The Android runtime: TF's TFLite interpreter (with the Flex delegate) running the exported
signatures exactly as FedKit's Android library calls them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xflwb.bridge.arrays import AnyArray
from xflwb.bridge.manifest import Manifest
from xflwb.bridge.runtime.base import Runtime


def load_interpreter(model: Path | bytes, num_threads: int | None = None) -> Any:
    """A ``tf.lite.Interpreter``; TF 2.18's wheel links the Flex delegate in automatically.

    ``num_threads`` is passed to ``tf.lite.Interpreter`` (its threads for the built-in
    kernels); ``None`` keeps TFLite's default.
    """
    if num_threads is not None and (isinstance(num_threads, bool)
                                    or not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    from xflwb._imports import skipping_package_init

    # TFLite's interpreter and TF's kernels (the Flex delegate's), not TF's whole Python API
    lite = skipping_package_init("tensorflow.lite.python.interpreter",
                                 "tensorflow.python.pywrap_tensorflow")

    # No XNNPACK delegate: in TF 2.18 it fails to resize some graphs (a MobileNetV2 backbone)
    # for batches of 256, 512, … and leaves the interpreter returning wrongly shaped outputs
    # afterwards. The built-in kernels are exact and, measured here, still faster than Keras.
    kw: dict[str, Any] = {"num_threads": num_threads, "experimental_op_resolver_type":
                          lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    from xflwb._quiet import quiet

    # quiet: "INFO: Created TensorFlow Lite delegate for select TF ops." on fd 2, natively
    with warnings.catch_warnings(), quiet():
        warnings.simplefilter("ignore")
        if isinstance(model, bytes | bytearray):
            interp = lite.Interpreter(model_content=bytes(model), **kw)
        else:
            interp = lite.Interpreter(model_path=str(model), **kw)
        interp.allocate_tensors()
    return interp


class AndroidRuntime(Runtime):
    """A virtual Android phone's model: parameters are ``a0..aN`` in canonical layout."""

    platform = "android"

    def __init__(self, manifest: Manifest, path: Path | bytes,
                 num_threads: int | None = None) -> None:
        super().__init__(manifest)
        self.num_threads = num_threads
        self.interpreter = load_interpreter(path, num_threads=num_threads)
        sigs = self.interpreter.get_signature_list()
        missing = {"train", "infer", "parameters", "restore"} - set(sigs)
        if missing:
            where = "the in-memory model" if isinstance(path, bytes) else str(path)
            raise ValueError(f"{where} lacks the FedKit signatures {sorted(missing)}")
        self._train = self.interpreter.get_signature_runner("train")
        self._infer = self.interpreter.get_signature_runner("infer")
        self._params = self.interpreter.get_signature_runner("parameters")
        self._restore = self.interpreter.get_signature_runner("restore")
        self._n = len(sigs["parameters"]["outputs"])
        self._shapes = [tuple(p["shape"]) for p in manifest["parameters"]]
        if self._n != len(self._shapes):
            raise ValueError(f"the .tflite has {self._n} parameters, the manifest "
                             f"{len(self._shapes)}")

    def get_parameters(self) -> list[AnyArray]:
        out = self._params()
        return [np.array(out[f"a{i}"], dtype=np.float32) for i in range(self._n)]

    def set_parameters(self, arrays: Sequence[AnyArray]) -> None:
        from xflwb.bridge import params

        shaped = params.from_platform(arrays, self.manifest, "android")
        self._restore(**{f"a{i}": a for i, a in enumerate(shaped)})

    def predict(self, x: AnyArray) -> AnyArray:
        x = self._check_x(x)
        if len(x) == 0:
            return np.zeros((0, *self.manifest["output_shape"]), np.float32)
        out = np.array(self._infer(x=x)["logits"], dtype=np.float32)
        if len(out) != len(x):  # never hand back a silently truncated batch
            raise RuntimeError(f"the TFLite interpreter returned {len(out)} rows for "
                               f"{len(x)} samples")
        return out

    def _begin_task(self) -> None:
        # restore() resets the optimizer state (FedKit restores before every round)
        self._restore(**{f"a{i}": a for i, a in enumerate(self.get_parameters())})

    def _train_step(self, x: AnyArray, y: AnyArray) -> float:
        return float(self._train(x=x, y=self._targets(y))["loss"])
