"""A numpy reference executor of Core ML updatable neural networks (the "virtual iPhone").

Core ML only runs on Apple hardware, so xflwb executes the ``.mlmodel`` protobuf itself:
one small kernel per Core ML layer type (``KERNELS``, filled by ``@register``), grouped by
theme, and ``CoreMLExecutor`` running the layer DAG and Core ML's training loop. Importing
this package pulls in neither TensorFlow nor coremltools.
"""

from __future__ import annotations

# kernel modules register themselves on import
from xflwb.bridge.coreml_exec import (  # noqa: F401
    activation,
    conv,
    dense,
    elementwise,
    normalization,
    pooling,
    recurrent,
    shape,
)
from xflwb.bridge.coreml_exec.base import KERNELS, Kernel, StepKernel, Weighted, register
from xflwb.bridge.coreml_exec.executor import (
    ADAM_EPSILON_MODES,
    MSE_REDUCTIONS,
    OVERRIDE_KEYS,
    CoreMLExecutor,
)

__all__ = ["ADAM_EPSILON_MODES", "KERNELS", "MSE_REDUCTIONS", "OVERRIDE_KEYS",
           "CoreMLExecutor", "Kernel", "StepKernel", "Weighted", "register"]
