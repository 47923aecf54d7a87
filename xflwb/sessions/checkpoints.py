"""Checkpoints: the global model of each round, written atomically with its sha256 and
verified when read back (a resume falls back past a missing or corrupt file), and pruned
by the session's retention options (``keep_checkpoints``, ``keep_every``) so a long run
cannot fill the disk.

Shared by phone sessions, simulations and the parent-side handle (``global_parameters``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xflwb.bridge import manifest as manifest_mod
from xflwb.bridge.arrays import Array
from xflwb.bridge.params import load_npz, save_npz
from xflwb.errors import SessionFailure
from xflwb.sessions.options import DEFAULT_KEEP_CHECKPOINTS as DEFAULT_KEEP
from xflwb.sessions.registry import Registry

log = logging.getLogger(__name__)


class CheckpointError(SessionFailure):
    """No usable checkpoint: the message names the file(s), why, and what to do."""


def save_checkpoint(registry: Registry, session_id: int, model: dict[str, Any], rnd: int,
                    arrays: list[Array]) -> Path:
    """Write the global model of round ``rnd`` and record it with the sha256 of its bytes
    (checked when it is loaded). Raises ``OSError`` (disk full, read-only folder) or a
    registry error; ``round_recorders`` logs those and training goes on."""
    folder: Path = registry.checkpoint_dir / model["name"] / f"session-{session_id}"
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
                    manifest: dict[str, Any] | None = None) -> list[Array]:
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
                            what: str) -> tuple[dict[str, Any], list[Array]]:
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



# -- retention ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Retention:
    """Which of a session's checkpoints stay on disk: the last ``keep_last`` written
    (None: all, nothing is pruned) and every round divisible by ``keep_every`` (None: no
    extra ones). Whatever a resume or report needs is kept as well (``prune_checkpoints``)."""

    keep_last: int | None = DEFAULT_KEEP
    keep_every: int | None = None

    @classmethod
    def of(cls, config: object) -> Retention:
        """The retention a session or simulation config asks for."""
        return cls(getattr(config, "keep_checkpoints", DEFAULT_KEEP),
                   getattr(config, "keep_every", None))


def prunable(rows: Iterable[dict[str, Any]], retention: Retention,
             protected: set[int]) -> list[dict[str, Any]]:
    """The checkpoints of one session (registry rows on disk) that ``retention`` lets go,
    oldest first: not among the last ``keep_last`` written, not on a ``keep_every`` round
    and not ``protected`` (ids)."""
    if retention.keep_last is None:
        return []
    by_age = sorted(rows, key=lambda r: int(r["id"]))
    keep = {int(r["id"]) for r in by_age[-retention.keep_last:]} | protected
    if retention.keep_every is not None:
        keep |= {int(r["id"]) for r in by_age if int(r["round"]) % retention.keep_every == 0}
    return [r for r in by_age if int(r["id"]) not in keep]


def prune_checkpoints(registry: Registry, session_id: int, model: dict[str, Any],
                      retention: Retention) -> list[int]:
    """Delete the session's checkpoints ``retention`` lets go; returns their ids. Called
    after a checkpoint was written and recorded, never before.

    Never deleted: the session's start (the weights it began from: round 0 or the round it
    resumed from), any checkpoint a session resumed from, and the newest one that verifies
    (what a resume and ``global_parameters`` pick; a diverged run's NaN checkpoints fail
    the check, so the last finite model survives however many rounds follow). Each row is
    marked ``pruned`` before its file goes: a crash in between leaves a file that no resume
    is offered, deleted by ``sweep_pruned`` at the model's next session start."""
    if retention.keep_last is None:
        return []
    rows = registry.checkpoints_newest_first(model["name"], session_id=session_id)
    start = registry.round_offset(registry.get_session(session_id))
    protected = registry.resumed_from_ids() | {int(r["id"]) for r in rows
                                                if int(r["round"]) == start}
    doomed = prunable(rows, retention, protected)
    if not doomed:
        return []
    newest = _newest_valid_id(rows, model["manifest"])
    if newest is None:
        log.warning("session %s: none of its checkpoints verifies; none is pruned", session_id)
        return []
    ids = [int(r["id"]) for r in doomed if int(r["id"]) != newest]
    registry.mark_checkpoints_pruned(ids)
    for r in doomed:
        if int(r["id"]) in ids:
            _unlink(Path(r["path"]))
    return ids


def _newest_valid_id(rows: list[dict[str, Any]], manifest: dict[str, Any]) -> int | None:
    """The id of the first of ``rows`` (newest first) that verifies, as a resume would pick
    it; without ``newest_valid_checkpoint``'s warnings, which would repeat every round of a
    diverged run. Reads back the newest file (the one just written) at least."""
    for row in rows:
        try:
            load_checkpoint(row["path"], row.get("sha256"), manifest)
        except CheckpointError:
            continue
        return int(row["id"])
    return None


def sweep_pruned(registry: Registry, model_name: str) -> int:
    """Delete files of ``model_name`` whose checkpoints are marked pruned (a crash between
    marking and deleting left them); returns how many. Only files whose row says pruned go:
    a file being written by a running simulation has no row yet and is left alone."""
    folder = registry.checkpoint_dir / model_name
    files = [str(p) for p in folder.glob("session-*/round-*.npz")]
    stale = registry.pruned_checkpoint_paths(files) if files else set()
    for path in stale:
        _unlink(Path(path))
    return len(stale)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # read-only folder: the row says pruned, a later sweep retries
        log.warning("pruned checkpoint %s not deleted (%s)", path, exc)
