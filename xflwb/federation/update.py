"""``Update``: one client's accepted contribution, in canonical space.

Everything after the gate (``xflwb.federation.gate``) sees updates in this one form, whatever
the platform's layout or the wire encoding it arrived in: the canonical tensors (the full
model, with the tensors the platform does not hold filled from the base it trained on), the
mask of the tensors its platform trains, and the examples it counts for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xflwb.bridge.arrays import Array


@dataclass
class Update:
    """One client's update after decoding, mapping and validation.

    ``tensors`` are canonical float32 arrays (a full model, not a delta); ``trained[k]``
    says whether the client's platform trains canonical tensor ``k`` (an untrained tensor
    holds the base's value and never dilutes the average). ``examples`` is what the update
    counts for after ``max_examples`` (``capped`` says it was cut). ``base_version`` is the
    global model version the client trained from (FedBuff's staleness; a round's number
    in synchronous rounds). ``codec`` is the wire encoding it arrived in, so the next model
    goes back in the same one ("raw" for a compressed update, whose native encoding is not
    seen: hosts keep the probe's). ``compression`` is the up-link codec's spec ("float32":
    none); ``float32_bytes`` what the update would have cost as float32 (4 × the elements of
    its platform's layout), the compression ratio's reference.
    """

    platform: str
    client: str
    tensors: list[Array]
    trained: list[bool]
    examples: int
    capped: bool = False
    base_version: int = 0
    codec: str = "raw"
    metrics: dict[str, Any] = field(default_factory=dict)
    fit_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    compression: str = "float32"
    float32_bytes: int = 0

    def delta(self, base: list[Array]) -> list[Array]:
        """``tensors − base`` (float32), zero where the platform trains nothing."""
        return [np.subtract(t, b, dtype=np.float32) if m else np.zeros(b.shape, np.float32)
                for t, b, m in zip(self.tensors, base, self.trained, strict=True)]
