"""Training sessions, by the names callers have always imported from here.

The pieces live in modules with one job each:

- ``xflwb.server.status``: ``SessionStatus`` and the ``ACTIVE`` / ``DONE`` tuples;
- ``xflwb.server.process``: the skeleton every session process (phone or simulation) runs
  in, and the recorders it wires into the strategy;
- ``xflwb.server.checkpoints``: writing and verifying checkpoints;
- ``xflwb.server.session_process``: the phone session's process (``run_session``);
- ``xflwb.server.manager``: ``SessionManager``, the parent side;
- ``xflwb.server.handle``: the ``Session`` handle and what is said about a session row.

``python -m xflwb.server.session DATA_DIR DB_URL SESSION_ID`` still runs a phone session.
"""

from __future__ import annotations

import sys

from xflwb.server.checkpoints import (
    CheckpointError,
    load_checkpoint,
    newest_valid_checkpoint,
    save_checkpoint,
)
from xflwb.server.handle import (
    Session,
    SessionTimeout,
    history_frame,
    resumes,
    started_from,
)
from xflwb.server.manager import SessionManager
from xflwb.server.process import (
    SessionProcess,
    process_logger,
    progress_path,
    progress_writer,
    round_recorders,
)
from xflwb.server.session_process import run_session
from xflwb.server.status import ACTIVE, DONE, SessionStatus

__all__ = [
    "ACTIVE", "DONE", "CheckpointError", "Session", "SessionManager", "SessionProcess",
    "SessionStatus", "SessionTimeout", "history_frame", "load_checkpoint",
    "newest_valid_checkpoint", "process_logger", "progress_path", "progress_writer",
    "resumes", "round_recorders", "run_session", "save_checkpoint", "started_from",
]

if __name__ == "__main__":  # python -m xflwb.server.session DATA_DIR DB_URL SESSION_ID
    run_session(sys.argv[1], sys.argv[2], int(sys.argv[3]))
