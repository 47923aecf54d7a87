"""Nothing left behind, nothing stale.

Sessions, simulations and device processes end when the kernel (or whatever process started
them) dies, even by SIGKILL; a fleet's table only ever shows its own devices."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

import xflwb
from xflwb import _lifeline
from xflwb.devices.fleet import Fleet, exit_reason, last_error_line
from xflwb.sessions.registry import Registry

from .conftest import digits_cnn
from .support import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GONE_WITHIN = 15.0  # seconds the issue allows for a dead kernel's processes to disappear


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    res = xflwb.export(digits_cnn(5), name="lifeline", data_type="digits",
                       out_dir=tmp_path_factory.mktemp("lifeline"),
                       optimizer=xflwb.SGD(learning_rate=0.05))
    return str(res.paths["manifest"].parent)


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie (dead, not yet reaped by its new parent) is gone."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _left_after_kill(kernel_pid: int, recorded: list[psutil.Process]) -> list[str]:
    """SIGKILL ``kernel_pid``, then poll up to ``GONE_WITHIN`` s for the recorded processes
    to end; returns a description of those still running."""
    os.kill(kernel_pid, signal.SIGKILL)
    with contextlib.suppress(AssertionError):  # the caller names those left, once cleaned up
        wait_until(lambda: not _running(recorded), GONE_WITHIN,
                   "the dead kernel's processes to end")
    left = _running(recorded)
    described = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
        with contextlib.suppress(psutil.Error):  # clean up what the test started, by pid
            p.kill()
    return described


def _kernel_code(data_dir: str, export_dir: str, engine: str) -> str:
    """What a notebook does: a workbench and a session with two devices, or a simulation;
    it prints their ids once the first round is done (every process is under way)."""
    return textwrap.dedent(f"""
        import json, time
        import xflwb
        wb = xflwb.Workbench(data_dir={data_dir!r}, port=0).start()
        wb.publish({export_dir!r})
        deadline = time.monotonic() + 240
        if {engine!r} == "simulation":
            session = wb.simulate("lifeline", android=2, rounds=100000, fraction_fit=0.5,
                                 wait=False)
            pids = []
        else:
            session = wb.train("lifeline", rounds=100000, min_clients=2, round_timeout=600)
            fleet = wb.spawn_devices(android=1, ios=1, dataset="digits")
            pids = [p.pid for p in fleet.procs.values()]
        while session.round < 1:
            assert session.status == "running" and time.monotonic() < deadline, session.info
            time.sleep(0.2)
        print("XFL-READY " + json.dumps({{"session": session.id, "devices": pids}}),
              flush=True)
        """)


def _commands(procs: list[psutil.Process]) -> dict[int, str]:
    """pid → command line, read while they run (a zombie has none)."""
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out[p.pid] = " ".join(p.cmdline())
    return out


def _run_kernel_script(data_dir: str, export_dir: str, engine: str
                       ) -> tuple[dict, dict[int, str], list[str]]:
    """The notebook's code in a plain Python process, SIGKILLed once under way: its ids,
    the processes it had started (pid → command) and those still running 15 s later."""
    code = _kernel_code(data_dir, export_dir, engine) + "time.sleep(3600)\n"
    kernel = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = kernel.stdout.readline()
        assert line.startswith("XFL-READY"), (line, kernel.stderr.read()[-3000:])
        ids = json.loads(line.split(" ", 1)[1])
        recorded = psutil.Process(kernel.pid).children(recursive=True)
        commands = _commands(recorded)
        left = _left_after_kill(kernel.pid, recorded)
    finally:
        kernel.kill()
        kernel.wait()
    return ids, commands, left


def _check_rows_stopped(data_dir: str, ids: list[int]) -> None:
    registry = Registry(data_dir)
    try:
        for sid in ids:
            row = registry.get_session(sid)
            assert row["status"] == "stopped", row
            assert row["error"] == _lifeline.REASON, row
    finally:
        registry.close()


def test_sigkilled_python_parent_leaves_no_simulation_or_ray_process(export_dir, tmp_path):
    """Any Python process, not only a Jupyter kernel (below: a session and its devices);
    the simulation started Ray itself, so Ray's processes go with it."""
    data_dir = str(tmp_path / "xfl")
    ids, recorded, left = _run_kernel_script(data_dir, export_dir, "simulation")
    names = " ".join(recorded.values())
    assert "raylet" in names and "gcs_server" in names, names  # Ray's, recorded too
    assert not left, left
    _check_rows_stopped(data_dir, [ids["session"]])


def test_sigkilled_jupyter_kernel_leaves_no_process(export_dir, tmp_path):
    from jupyter_client.manager import KernelManager

    data_dir = str(tmp_path / "xfl")
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    out: list[str] = []

    def keep(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))

    try:
        kc.wait_for_ready(timeout=120)
        kernel_pid = km.provisioner.pid
        reply = kc.execute_interactive(_kernel_code(data_dir, export_dir, "phones"),
                                       timeout=300, output_hook=keep)
        text = "".join(out)
        assert reply["content"]["status"] == "ok", text[-3000:]
        ids = json.loads(text.split("XFL-READY ", 1)[1].splitlines()[0])
        recorded = psutil.Process(kernel_pid).children(recursive=True)
        assert set(ids["devices"]) <= {p.pid for p in recorded}
        assert len(recorded) >= 3, _commands(recorded)  # session + 2 devices
        left = _left_after_kill(kernel_pid, recorded)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert not left, left
    _check_rows_stopped(data_dir, [ids["session"]])


_CHILD = textwrap.dedent("""
    import signal, sys, time
    from xflwb import _lifeline
    def bye(*_):
        with open(sys.argv[1], "w") as f:
            f.write(str(_lifeline.stop_reason()))
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    assert _lifeline.install()
    print("ready", flush=True)
    time.sleep(600)
    """)

_LAUNCHER = textwrap.dedent("""
    import subprocess, sys, threading, time
    from xflwb import _lifeline
    procs = []
    def launch():  # a short-lived thread, like the HTTP server's worker threads
        p = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                             env=_lifeline.child_env(), stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        procs.append(p)
    t = threading.Thread(target=launch)
    t.start()
    t.join()
    time.sleep(2)  # the child got its parent-death signal when the thread ended
    print(procs[0].pid, procs[0].poll(), flush=True)
    time.sleep(3600)
    """)


def test_child_outlives_the_launching_thread_but_not_the_process(tmp_path):
    marker = tmp_path / "stopped.txt"
    parent = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _CHILD, str(marker)],
                              stdout=subprocess.PIPE, text=True)
    try:
        pid, code = parent.stdout.readline().split()
        assert code == "None"  # still running after its launching thread exited
        child = psutil.Process(int(pid))
        left = _left_after_kill(parent.pid, [child])
    finally:
        parent.kill()
        parent.wait()
    assert not left, left
    assert marker.read_text() == _lifeline.REASON  # ended through its own SIGTERM handler


def test_fleet_shows_only_its_own_devices_and_why_one_died(export_dir, tmp_path):
    data_dir = tmp_path / "xfl"
    with xflwb.Workbench(data_dir=data_dir, port=0) as wb:  # the first kernel
        wb.publish(export_dir)
        first = wb.spawn_devices(android=1, ios=1, dataset="digits", max_wait=0.5)
        old = first.wait(timeout=120)
    assert list(old.status) == ["no session"] * 2, old
    with xflwb.Workbench(data_dir=data_dir, port=0) as wb:  # a new kernel, same data dir
        second = wb.spawn_devices(android=1, ios=1, dataset="digits", max_wait=60)
        assert second.ids == first.ids  # device ids restart in each kernel…
        assert second.workdir != first.workdir  # …but never the directory
        table = second.table
        assert list(table.id) == second.ids
        # max_wait=60 with no session: this run's devices cannot have given up yet
        assert "no session" not in set(table.status), table
        # a fleet in a directory holding an older run's status files does not read them
        reused = Fleet(wb.url, first.workdir, android=1, ios=1, first_device_id=first.ids[0])
        assert list(reused.table.status) == ["starting"] * 2, reused.table
        assert reused.table.train_size.isna().all()
        # a device that dies at startup says so and why (the dataset typo of issue 11)
        typo = Fleet(wb.url, tmp_path / "typo", android=1, dataset="digit").start()
        row = typo.wait(timeout=120).iloc[0]
        second.stop()
    assert row.status == "failed", row
    assert row.error.startswith("exited with code 2: ") and "'digit'" in row.error, row.error


def test_exit_reasons_name_the_signal_or_the_last_error():
    log = "INFO start\nTraceback (most recent call last):\n  File x\nValueError: bad\n\n"
    assert last_error_line(log) == "ValueError: bad"
    assert last_error_line("one\ntwo\n") == "two"
    assert last_error_line("") is None
    assert exit_reason(1, log) == "exited with code 1: ValueError: bad"
    assert exit_reason(-signal.SIGKILL, log) == "killed by SIGKILL"
