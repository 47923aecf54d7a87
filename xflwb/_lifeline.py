"""Child processes end with the process that started them, even when it is SIGKILLed.

Sessions, simulations and virtual devices run in their own processes; when the notebook
kernel dies (shutdown, restart, OOM-kill, SIGKILL) nobody is left to stop them, and they
would live on reparented to PID 1, still holding their gRPC ports. The launcher puts its pid
in the child's environment (``child_env``); the child calls ``install()`` once its SIGTERM
handler is in place. Two mechanisms then end it gracefully, through that very handler
(which can still mark its session row ``stopped`` and shut Ray down):

* Linux: ``prctl(PR_SET_PDEATHSIG)``, the kernel's immediate notice. It fires when the
  parent *thread* that forked exits, and the workbench may launch from short-lived threads
  (the HTTP server's worker pool), so it sends ``SIGUSR2`` to a handler that checks that the
  parent *process* is really gone, never a bare SIGTERM.
* Everywhere: a daemon thread polling the parent every second.

The launcher starts its children in their own session (``start_new_session=True``), so the
SIGINT a notebook's Stop button sends to the kernel's process group stops only the kernel's
wait, never a session or a phone; the lifeline, which watches the parent's pid and not the
process group, still ends them when the kernel dies. ``reap`` collects a child's exit
status once it exits, so no ``<defunct>`` entry lingers under a long-lived kernel.

Standard library only: server, devices and simulation import it; it imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

#: environment variable carrying the launcher's pid to the child
ENV = "XFLWB_PARENT_PID"
#: why a child stopped when its launcher died (stored as the session's ``error``)
REASON = "the notebook kernel (or the process) that started it exited"
_PR_SET_PDEATHSIG = 1
_PDEATH_SIGNAL = getattr(signal, "SIGUSR2", None)

_lock = threading.Lock()
_state: dict[str, Any] = {"parent": None, "direct": False, "fired": False, "grace": 10.0}

#: children ``reap`` watches until they exit (``Popen`` objects; keyed by id: unhashable-safe)
_reaped: dict[int, Any] = {}
_reaper: dict[str, threading.Thread | None] = {"thread": None}


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that must not outlive this process."""
    out = dict(os.environ if env is None else env)
    out[ENV] = str(os.getpid())
    return out


def reap(proc: Any, every: float = 0.5) -> None:
    """Collect ``proc``'s (a ``subprocess.Popen``) exit status as soon as it exits.

    Its owner keeps the ``Popen`` (to read its exit code, to stop it), so Python never
    reaps it for us; an exited child nobody waits for stays a zombie. One daemon thread
    polls every watched child (``Popen.poll`` is safe beside a concurrent ``wait``: both
    take the object's own lock) and ends once none is left. Hand-written rather than a
    SIGCHLD handler, which would steal other libraries' children from their ``wait``."""
    with _lock:
        _reaped[id(proc)] = proc
        thread = _reaper["thread"]
        if thread is not None and thread.is_alive():
            return

        def loop() -> None:
            while True:
                time.sleep(every)
                with _lock:
                    for key, p in list(_reaped.items()):
                        with contextlib.suppress(Exception):
                            if p.poll() is not None:
                                del _reaped[key]
                    if not _reaped:
                        _reaper["thread"] = None
                        return

        thread = threading.Thread(target=loop, name="xflwb-reaper", daemon=True)
        _reaper["thread"] = thread
        thread.start()


def parent_gone() -> bool:
    """Whether this process is ending because its launcher died."""
    return bool(_state["fired"])


def stop_reason() -> str | None:
    """``REASON`` once the launcher died, else None (a plain ``stop()``)."""
    return REASON if parent_gone() else None


def pid_alive(pid: int | None) -> bool:
    """Whether process ``pid`` exists (a pid we may not signal counts as alive)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parent_dead() -> bool:
    parent = _state["parent"]
    if parent is None:
        return False
    if _state["direct"]:  # reparented (to init or a subreaper): no pid-reuse ambiguity
        return bool(os.getppid() != parent)
    return not pid_alive(parent)


def _fire(grace: float) -> None:
    """Ask this process to stop as ``stop()`` would (SIGTERM), then insist after ``grace``."""
    with _lock:
        if _state["fired"]:
            return
        _state["fired"] = True
    with contextlib.suppress(Exception):
        sys.stderr.write(f"xflwb: parent process {_state['parent']} exited; stopping\n")
        sys.stderr.flush()

    def hard_exit() -> None:
        time.sleep(grace)
        os._exit(143)  # the graceful path did not finish in time: 128 + SIGTERM

    threading.Thread(target=hard_exit, name="xflwb-lifeline-exit", daemon=True).start()
    os.kill(os.getpid(), signal.SIGTERM)


def _on_pdeath(_sig: int, _frame: Any) -> None:
    if _parent_dead():  # not merely the launching thread of a live parent
        _fire(_state["grace"])


def _arm_pdeathsig() -> bool:
    """Linux only; False where prctl is unavailable."""
    if not sys.platform.startswith("linux") or _PDEATH_SIGNAL is None:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        signal.signal(_PDEATH_SIGNAL, _on_pdeath)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, int(_PDEATH_SIGNAL), 0, 0, 0) == 0)
    except (OSError, AttributeError, ValueError):  # no libc prctl, or not the main thread
        return False


def install(parent_pid: int | None = None, poll: float = 1.0, grace: float = 10.0) -> bool:
    """Stop this process (SIGTERM to itself) when its launcher exits.

    ``parent_pid`` defaults to ``$XFLWB_PARENT_PID`` (removed from the environment, so this
    process's own children watch this process, not the kernel). Call it from the main
    thread after installing the SIGTERM handler. Returns False when there is no parent to
    watch (the process was started by hand)."""
    if parent_pid is None:
        raw = os.environ.pop(ENV, "")
        try:
            parent_pid = int(raw)
        except ValueError:
            return False
    if parent_pid <= 1:
        return False
    with _lock:
        if _state["parent"] is not None:
            return True
        _state.update(parent=parent_pid, direct=os.getppid() == parent_pid, grace=grace)
    _arm_pdeathsig()
    if not _state["direct"] and not pid_alive(parent_pid):  # it died before we got here
        _fire(grace)
        return True
    if _parent_dead():  # it died between the check and prctl
        _fire(grace)
        return True

    def watch() -> None:
        while not _parent_dead():
            time.sleep(poll)
        _fire(grace)

    threading.Thread(target=watch, name="xflwb-lifeline", daemon=True).start()
    return True
