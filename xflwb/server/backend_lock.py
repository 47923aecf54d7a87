"""One backend per data directory: a lock held while a workbench serves it, and a record of
where it serves.

Two backends on one data directory would both launch sessions against the same registry,
each believing it owns their processes. ``Workbench.start`` takes an exclusive ``flock`` on
``DATA_DIR/backend.lock`` (released by the kernel when the process dies, however it dies:
a crashed backend's lock is never stale) and writes ``backend.json`` (pid, url) beside it,
which a refused start quotes. Where ``fcntl`` is missing (Windows) the record alone decides,
and a record whose pid is dead is ignored. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import IO, Any

from xflwb import _lifeline
from xflwb.errors import BackendError

try:
    import fcntl
except ImportError:  # Windows: the pid record alone
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "backend.lock"
RECORD_FILE = "backend.json"


class BackendRunning(BackendError, OSError):
    """Another backend (in this process or another) already serves the data directory."""


def read_record(data_dir: str | Path) -> dict[str, Any] | None:
    """The running backend's record (pid, url, started), or None (none, or unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((Path(data_dir) / RECORD_FILE).read_text())
        if isinstance(data, dict):
            return data
    return None


def refusal(data_dir: str | Path, record: dict[str, Any] | None) -> str:
    """What a second start is told: where the running backend is, and what to do."""
    record = record or {}
    pid = record.get("pid")
    where = f" at {record['url']}" if record.get("url") else ""
    who = (f"pid {pid}, this process" if pid == os.getpid()
           else f"pid {pid}" if pid else "pid unknown")
    return (f"a backend is already serving {data_dir}{where} ({who}): use it, or stop it "
            "first (wb.stop(), %xfl_server stop, or end that process); or pass another "
            "data_dir")


class BackendLock:
    """The exclusive right to serve ``data_dir``: ``acquire``, ``publish(url)``, ``release``."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        """Take the lock, or raise ``BackendRunning`` naming the backend that holds it."""
        if self._file is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            record = read_record(self.data_dir)
            if record is not None and _lifeline.pid_alive(record.get("pid")):
                raise BackendRunning(refusal(self.data_dir, record))
            self._file = open(self.data_dir / LOCK_FILE, "a")  # noqa: SIM115
            return
        f = open(self.data_dir / LOCK_FILE, "a")  # noqa: SIM115 - held while serving
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise BackendRunning(refusal(self.data_dir, read_record(self.data_dir))) from None
        self._file = f

    def publish(self, url: str) -> None:
        """Record this process and ``url`` for a refused start to quote (atomic write)."""
        path = self.data_dir / RECORD_FILE
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "url": url, "started": time.time()}))
        os.replace(tmp, path)

    def release(self) -> None:
        """Remove our record and let the lock go (idempotent)."""
        if self._file is None:
            return
        record = read_record(self.data_dir)
        if record is not None and record.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                (self.data_dir / RECORD_FILE).unlink()
        with contextlib.suppress(OSError):
            self._file.close()  # closing the descriptor releases the flock
        self._file = None
