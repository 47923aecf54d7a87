"""Keep TensorFlow's, absl's and the TFLite converter's log lines out of cells, the CLI and
the demo, unless asked for (``verbose=True``, ``--verbose`` or ``XFLWB_VERBOSE=1``).

Two kinds of noise need two remedies. TensorFlow's own C++ logging reads
``TF_CPP_MIN_LOG_LEVEL`` once, when TensorFlow is imported: `install` sets it (unless the
user already did) when ``xflwb`` is imported, which precedes every lazy TensorFlow import in
the package. The converter (MLIR, absl ``W0000`` lines) and TFLite's delegates log natively
to file descriptor 2 whatever that level says, so `quiet` captures fd 2 while they run:
Python's ``sys.stderr`` cannot see those writes, and neither can ``contextlib.redirect_stderr``.
Nothing is lost: lines that are not TensorFlow noise are written back afterwards, and when
the block fails the captured text is attached to the error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

LEVEL_VAR = "TF_CPP_MIN_LOG_LEVEL"
VERBOSE_VAR = "XFLWB_VERBOSE"

#: One line of TensorFlow / absl / TFLite / MLIR native logging (what `quiet` hides).
NOISE = re.compile(
    r"^\s*$"                                                      # blank separators
    r"|^[WIEF]\d{4} "                                             # absl: W0000 00:00:…
    r"|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [WIEF] "              # TF: 2024-… I tensorflow/…
    r"|^WARNING: All log messages before absl::InitializeLog"
    r"|^INFO: (Created TensorFlow Lite|TfLite|Initialized TensorFlow Lite)"
    r"|^To enable the following instructions:"                    # cpu_feature_guard, line 2
    r"|^WARNING:(absl|tensorflow):"
    r"|XNNPACK|MLIR|mlir_|tensorflow/")

_user_level: str | None = None
_installed = False
_lock = threading.RLock()
_active: list[Captured] = []  # the capture in progress (nested blocks share it)
_chosen = threading.local()  # verbose=… of the enclosing quiet() block, per thread


def install() -> None:
    """Before TensorFlow is imported: TF's C++ logs at level 2 unless the user chose a level."""
    global _installed, _user_level
    if _installed:
        return
    _installed = True
    _user_level = os.environ.get(LEVEL_VAR)
    os.environ.setdefault(LEVEL_VAR, "2")


def is_verbose(verbose: bool | None = None) -> bool:
    """``verbose`` if given, else an enclosing ``quiet(verbose=…)`` block's choice, else
    ``XFLWB_VERBOSE`` (unset: quiet)."""
    if verbose is not None:
        return bool(verbose)
    chosen = getattr(_chosen, "verbose", None)
    if chosen is not None:
        return bool(chosen)
    return os.environ.get(VERBOSE_VAR, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def _choose(verbose: bool | None) -> Iterator[None]:
    """Blocks nested in ``quiet(verbose=True)`` (the converter's, the interpreter's) obey it."""
    old = getattr(_chosen, "verbose", None)
    if verbose is not None:
        _chosen.verbose = bool(verbose)
    try:
        yield
    finally:
        _chosen.verbose = old


def set_verbose(on: bool = True) -> None:
    """Process-wide switch (the CLI's ``--verbose``); child processes inherit it.

    Also lowers TensorFlow's C++ level to 0 when TensorFlow is not imported yet and the user
    did not choose a level, so ``--verbose`` shows everything TensorFlow has to say.
    """
    install()
    os.environ[VERBOSE_VAR] = "1" if on else "0"
    if _user_level is None and "tensorflow" not in sys.modules:
        os.environ[LEVEL_VAR] = "0" if on else "2"


def is_noise(line: str) -> bool:
    return bool(NOISE.search(line))


def strip_noise(text: str) -> str:
    """``text`` without TensorFlow / absl / TFLite log lines."""
    return "".join(ln for ln in text.splitlines(keepends=True) if not is_noise(ln))


class Captured:
    """What native code wrote to fd 2 during a `quiet` block (readable while it runs)."""

    def __init__(self, fd: int | None = None) -> None:
        self._fd = fd
        self._final: str | None = None

    @property
    def text(self) -> str:
        if self._final is not None or self._fd is None:
            return self._final or ""
        # pread: the file offset is shared with fd 2, which native code keeps writing at
        data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
        return data.decode("utf-8", "replace")

    def tail(self, lines: int = 40) -> str:
        kept = self.text.rstrip().splitlines()
        return "\n".join((["…"] if len(kept) > lines else []) + kept[-lines:])


@contextlib.contextmanager
def _loggers_at_error() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("tensorflow", "absl")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.setLevel(level)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]


@contextlib.contextmanager
def quiet(verbose: bool | None = None) -> Iterator[Captured]:
    """Hide TensorFlow / absl / converter logging for the block; yields what fd 2 received.

    Python's ``tensorflow`` and ``absl`` loggers are held at ERROR, and fd 2 is redirected
    to a temporary file (process-wide, so one capture at a time: nested blocks share the
    outer one). Afterwards the lines that are not TensorFlow noise are written back to fd 2;
    if the block raises, they are added to the exception as a note instead. A caller that
    turns a failure into its own error reads ``captured.tail()`` to include the native log
    (the TFLite converter does). ``verbose`` (or `is_verbose`) makes it do nothing.
    """
    with _choose(verbose), _capture(is_verbose(verbose)) as captured:
        yield captured


@contextlib.contextmanager
def _capture(verbose: bool) -> Iterator[Captured]:
    if verbose:
        yield Captured()
        return
    with _lock, _loggers_at_error():
        if _active:  # nested: the outer block captures already
            yield _active[-1]
            return
        tmp, saved = _redirectable()
        if tmp is None or saved is None:  # better noise than no export
            yield Captured()
            return
        with tmp:
            captured = Captured(tmp.fileno())
            _active.append(captured)
            os.dup2(tmp.fileno(), 2)
            try:
                yield captured
            except BaseException as exc:
                _restore(saved)
                captured._final = captured.text
                rest = strip_noise(captured._final).rstrip()
                if rest and not isinstance(exc, KeyboardInterrupt | SystemExit):
                    exc.add_note(f"stderr meanwhile:\n{rest}")
                raise
            else:
                _restore(saved)
                captured._final = captured.text
                rest = strip_noise(captured._final)
                if rest:
                    os.write(2, rest.encode())
            finally:
                _active.pop()
                with contextlib.suppress(OSError):
                    os.close(saved)


def _redirectable() -> tuple[Any, int | None]:
    """A temporary file for fd 2's output and a copy of fd 2 (None, None: cannot capture,
    e.g. no writable temp directory or no fd 2 in a daemon)."""
    try:
        tmp = tempfile.TemporaryFile(prefix="xflwb-stderr-")  # noqa: SIM115 (caller closes)
    except OSError:
        return None, None
    _flush()
    try:
        return tmp, os.dup(2)
    except OSError:
        tmp.close()
        return None, None


def _restore(saved: int) -> None:
    _flush()
    os.dup2(saved, 2)


install()  # on import: xflwb/__init__ imports this module before anything else
