"""Checkpoints: the global model of each round, written atomically with its sha256 and
verified when read back (a resume falls back past a missing or corrupt file).

Shared by phone sessions, simulations and the parent-side handle (``global_parameters``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from xflwb.bridge import manifest as manifest_mod
from xflwb.bridge.params import load_npz, save_npz
from xflwb.server.registry import Registry

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint: the message names the file(s), why, and what to do."""


def save_checkpoint(registry: Registry, session_id: int, model: dict[str, Any], rnd: int,
                    arrays: list[np.ndarray]) -> Path:
    """Write the global model of round ``rnd`` and record it with the sha256 of its bytes
    (checked when it is loaded). Raises ``OSError`` (disk full, read-only folder) or a
    registry error; ``round_recorders`` logs those and training goes on."""
    folder = registry.checkpoint_dir / model["name"] / f"session-{session_id}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{rnd:05d}.npz"
    tmp = folder / f".round-{rnd:05d}.tmp.npz"
    try:
        save_npz(tmp, arrays)
        digest = manifest_mod.sha256(tmp)
        os.replace(tmp, path)  # a kill mid-write never leaves a half checkpoint
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    registry.add_checkpoint(session_id, model, rnd, path, sha256=digest)
    return path


def load_checkpoint(path: str | Path, sha256: str | None = None,
                    manifest: dict[str, Any] | None = None) -> list[np.ndarray]:
    """The arrays of a checkpoint file, verified: its sha256 (when recorded), a readable
    ``.npz`` of real float arrays, finite values, and (given the ``manifest``) the model's
    tensor count and shapes. ``CheckpointError`` says what is wrong with which file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if sha256 is not None:
        got = manifest_mod.sha256(path)
        if got != sha256:
            raise CheckpointError(f"{path} does not match its recorded sha256 ({got[:12]}… "
                                  f"instead of {sha256[:12]}…): the file changed after it "
                                  "was written")
    try:
        arrays = load_npz(path)
    except Exception as exc:  # truncated, garbage, not a zip, missing members
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: "
                              f"{exc})") from None
    for i, a in enumerate(arrays):
        if a.dtype.kind != "f":
            raise CheckpointError(f"{path}: tensor {i} has dtype {a.dtype}, not float")
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise CheckpointError(f"{path}: tensor {i} holds {bad} NaN/inf values")
    if manifest is not None:
        want = [tuple(p["shape"]) for p in manifest["parameters"]]
        if len(arrays) != len(want):
            raise CheckpointError(f"{path} holds {len(arrays)} tensors; model "
                                  f"{manifest['name']} has {len(want)}")
        for i, (a, shape) in enumerate(zip(arrays, want, strict=True)):
            if a.shape != shape:
                raise CheckpointError(f"{path}: tensor {i} has shape {a.shape}; model "
                                      f"{manifest['name']} expects {shape}")
    return [a.astype(np.float32) for a in arrays]


def newest_valid_checkpoint(candidates: list[dict[str, Any]], manifest: dict[str, Any],
                            what: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The first checkpoint of ``candidates`` (newest first) that verifies, logging why
    each newer one was skipped; ``CheckpointError`` naming every file when none does."""
    problems: list[str] = []
    for ckpt in candidates:
        try:
            arrays = load_checkpoint(ckpt["path"], ckpt.get("sha256"), manifest)
        except CheckpointError as exc:
            problems.append(str(exc))
            log.warning("skipping checkpoint %s (session %s, round %s): %s", ckpt["id"],
                        ckpt["session_id"], ckpt["round"], exc)
            continue
        if problems:
            log.warning("falling back to checkpoint %s (%s, session %s, round %s), the newest "
                        "valid one", ckpt["id"], ckpt["path"], ckpt["session_id"],
                        ckpt["round"])
        return ckpt, arrays
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                       if len(problems) > 5 else "")
    raise CheckpointError(f"no valid checkpoint of {what}: {shown}")

