"""What the backend's data dir holds on disk: ``xflwb server status``, ``%xfl_server status``
and ``Workbench.disk_usage()`` report it, so checkpoint retention can be checked and tuned.

Sizes are of the files as they are now (``stat``), not of what the registry believes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xflwb.sessions.registry import Registry


@dataclass(frozen=True)
class DiskUsage:
    """Bytes (and checkpoint counts) under one data dir."""

    data_dir: str
    checkpoint_files: int  # ``.npz`` files under ``checkpoints/``
    checkpoint_bytes: int
    checkpoints_kept: int  # registry rows whose file is on disk (as far as it knows)
    checkpoints_pruned: int  # rows whose file retention deleted
    artifact_bytes: int  # published models (``registry/``)
    database_bytes: int | None  # the SQLite file and its WAL; None: not a file in data_dir
    log_bytes: int
    total_bytes: int  # everything under the data dir

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The human report, one line per kind of file."""
        db = ("not a file here (db_url)" if self.database_bytes is None
              else human_bytes(self.database_bytes))
        return [
            f"data dir     {self.data_dir}",
            f"checkpoints  {self.checkpoint_files} files, {human_bytes(self.checkpoint_bytes)}"
            f" ({self.checkpoints_kept} kept, {self.checkpoints_pruned} pruned by retention)",
            f"artifacts    {human_bytes(self.artifact_bytes)}",
            f"database     {db}",
            f"logs         {human_bytes(self.log_bytes)}",
            f"total        {human_bytes(self.total_bytes)}",
        ]


def human_bytes(n: int) -> str:
    """``"1.5 MiB (1,572,864 bytes)"``: readable, and exact for whoever compares."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    shown = f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
    return f"{shown} ({n:,} bytes)"


def _tree(path: Path, pattern: str = "*") -> tuple[int, int]:
    """(files, bytes) of the regular files under ``path`` matching ``pattern``; files
    removed while walking are skipped (a session may be pruning)."""
    files = size = 0
    if not path.is_dir():
        return 0, 0
    for p in path.rglob(pattern):
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and not p.is_symlink():
            files, size = files + 1, size + st.st_size
    return files, size


def _database_bytes(registry: Registry) -> int | None:
    """The SQLite database's bytes (with ``-wal`` and ``-shm``) when it lives in the data
    dir; None for a server database (PostgreSQL) or a file elsewhere."""
    db = registry.database_file()
    if db is None or registry.data_dir not in db.parents:
        return None
    return sum(os.path.getsize(p) for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"))
               if p.is_file())


def disk_usage(registry: Registry) -> DiskUsage:
    """What ``registry``'s data dir holds now."""
    files, ckpt_bytes = _tree(registry.checkpoint_dir, "*.npz")
    counts = registry.checkpoint_counts()
    return DiskUsage(
        data_dir=str(registry.data_dir), checkpoint_files=files, checkpoint_bytes=ckpt_bytes,
        checkpoints_kept=counts["kept"], checkpoints_pruned=counts["pruned"],
        artifact_bytes=_tree(registry.artifact_dir)[1],
        database_bytes=_database_bytes(registry),
        log_bytes=_tree(registry.data_dir / "logs")[1],
        total_bytes=_tree(registry.data_dir)[1])
