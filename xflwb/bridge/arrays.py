"""The bridge's array types, named once so signatures say what dtype travels.

Parameters are float32 everywhere they are canonical, on a platform or on the wire
(``Array``); inputs, labels and kernel intermediates may hold any dtype (``AnyArray``).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

#: a float32 tensor: a model parameter, an update, a decoded wire tensor
Array: TypeAlias = npt.NDArray[np.float32]
#: an array whose dtype the caller chooses (inputs, labels, intermediates)
AnyArray: TypeAlias = npt.NDArray[Any]
