"""An interrupt stops only the wait; children are reaped; one backend per data directory.

Issue 21, items 2 and 7: JupyterLab's Stop sends SIGINT to the kernel's whole process group,
which killed the virtual devices and failed the session; exited children stayed
``<defunct>`` under the kernel; a second start on a data directory started a second
backend; ``%xfl_server status`` printed the admin token; session logs held ANSI codes.

SIGINT is never sent to pytest's own process group: the end-to-end test runs a small
"kernel" script in its own process group and interrupts that group, as Jupyter does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import xflwb
from xflwb.server.backend_lock import RECORD_FILE, BackendRunning

from .conftest import digits_cnn
from .support import wait_until
from .wirephone import WirePhone

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ANSI = re.compile(r"\x1b\[")
REAPED_WITHIN = 15.0  # seconds a child that exited may stay a zombie (the reaper polls 0.5 s)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    res = xflwb.export(digits_cnn(5), name="stop", data_type="digits",
                       out_dir=tmp_path_factory.mktemp("stop"),
                       optimizer=xflwb.SGD(learning_rate=0.05))
    return str(res.paths["manifest"].parent)


def _zombies(pids: list[int]) -> list[int]:
    """Those of ``pids`` that are zombie children of this process."""
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            if p.ppid() == os.getpid() and p.status() == psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


def test_sessions_run_in_their_own_session_are_reaped_and_log_plain_text(export_dir,
                                                                         tmp_path):
    """Three sessions end on their own: none is left ``<defunct>`` (nobody waits for them:
    the reaper does), each ran in its own process session (the kernel's SIGINT never
    reaches it), and its log file is plain text although Flower logged to it."""
    pids = []
    with xflwb.Workbench(data_dir=tmp_path / "xfl", port=0) as wb:
        wb.publish(export_dir)
        for k in range(3):
            s = wb.train("stop", rounds=1, min_clients=1, round_timeout=60)
            proc = wb.sessions._procs[s.id]
            assert os.getsid(proc.pid) != os.getsid(0)
            assert os.getpgid(proc.pid) != os.getpgid(0)
            phone = WirePhone(wb.url, "android", "digits", lambda ts, _r: ts, device_id=k + 1)
            thread = phone.start()
            assert s.wait(timeout=120) == "finished"
            thread.join(30)
            assert phone.report.error is None, phone.report.error
            pids.append(proc.pid)
        # while the workbench still runs: no stop() reaped
        wait_until(lambda: not _zombies(pids), REAPED_WITHIN, f"sessions {pids} reaped",
                   describe=lambda: f"zombies: {_zombies(pids)}")
        log = (wb.sessions.log_dir / f"session-{s.id}.log").read_text()
    assert "INFO" in log, log[-2000:]  # Flower's handler wrote to it
    assert not ANSI.search(log), [ln for ln in log.splitlines() if "\x1b" in ln][:5]


_DRIVER = textwrap.dedent("""
    import json, signal, sys, time
    import psutil
    import xflwb
    data_dir, export_dir = sys.argv[1], sys.argv[2]
    wb = xflwb.Workbench(data_dir=data_dir, port=0).start()
    wb.publish(export_dir)
    # three rounds: the session is still running when the interrupt comes, however late
    # the devices report "joined" on a loaded machine
    s = wb.train("stop", rounds=3, min_clients=2, round_timeout=300)
    # network_delay: every answer takes 2 s, so the session still runs when interrupted
    fleet = wb.spawn_devices(android=2, dataset="digits", network_delay=2.0)
    deadline = time.monotonic() + 240
    while not all(r["status"] in ("joined", "training") for r in fleet.statuses()):
        assert s.status == "running" and time.monotonic() < deadline, (s.info, fleet.table)
        time.sleep(0.2)
    out = {"session_pid": wb.sessions._procs[s.id].pid,
           "device_pids": [p.pid for p in fleet.procs.values()]}
    # what ipykernel does: SIGINT raises KeyboardInterrupt; counted, so a press that never
    # becomes a KeyboardInterrupt in the wait shows in the result (diagnosis of a CI flake)
    out["sigints"] = 0

    def _interrupt(signum, frame):
        out["sigints"] += 1
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, _interrupt)
    print("XFL-READY " + json.dumps(out), flush=True)
    try:
        s.wait(timeout=300)
        out["interrupted"] = None
    except KeyboardInterrupt as exc:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one Stop is enough: later ones ignored
        out["interrupted"] = str(exc)
        print("XFL-INTERRUPTED", flush=True)
    out["status_after_interrupt"] = s.status
    out["final"] = s.wait(timeout=300)
    out["round"] = s.round
    fleet_table = fleet.wait(timeout=120)
    out["devices"] = fleet_table[["status", "error"]].astype(str).values.tolist()
    out["codes"] = [p.returncode for p in fleet.procs.values()]
    logs = [(fleet.workdir / f"device-{i}.log").read_text() for i in fleet.ids]
    out["device_log_ansi"] = sum("\\x1b[" in log for log in logs)
    out["device_log_chars"] = sum(len(log) for log in logs)
    wb.stop()
    print("XFL-DONE " + json.dumps(out), flush=True)
    """)


def test_sigint_to_the_kernels_process_group_only_stops_the_wait(export_dir, tmp_path):
    """What JupyterLab's Stop does (SIGINT to the kernel's process group) during
    ``s.wait()``: the wait raises KeyboardInterrupt saying the session still runs, the two
    virtual devices keep training and the session finishes all its rounds."""
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(tmp_path / "xfl"), export_dir],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own group: the SIGINT below never reaches pytest
    try:
        line = driver.stdout.readline()
        assert line.startswith("XFL-READY"), (line, driver.stderr.read()[-3000:])
        ready = json.loads(line.split(" ", 1)[1])
        for pid in [ready["session_pid"], *ready["device_pids"]]:
            assert os.getpgid(pid) != driver.pid  # not in the group the interrupt reaches
        # JupyterLab's Stop, pressed again if nothing happened: on a loaded machine one
        # SIGINT was once followed by no KeyboardInterrupt in the driver (seen twice in CI,
        # cause unknown); the wait must still be what stops, never the session
        for _press in range(5):
            time.sleep(0.5)  # let the driver enter s.wait() (it prints just before)
            os.killpg(driver.pid, signal.SIGINT)
            if select.select([driver.stdout], [], [], 10)[0]:
                break
        out, err = driver.communicate(timeout=400)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    done = [ln for ln in out.splitlines() if ln.startswith("XFL-DONE")]
    assert done, (out[-2000:], err[-3000:])
    result = json.loads(done[0].split(" ", 1)[1])
    assert result["interrupted"] is not None, result  # the wait was interrupted…
    assert "still running" in result["interrupted"] and "stop()" in result["interrupted"]
    assert result["status_after_interrupt"] == "running", result  # …the session was not
    assert result["final"] == "finished" and result["round"] == 3, (result, err[-3000:])
    assert [d[0] for d in result["devices"]] == ["finished", "finished"], result
    assert result["codes"] == [0, 0], result  # not "killed by SIGINT"
    assert result["device_log_chars"] > 0 and result["device_log_ansi"] == 0, result


# -- one backend per data directory ------------------------------------------------------------
def test_a_second_backend_on_a_data_dir_is_refused_with_the_first_ones_url(tmp_path):
    data = tmp_path / "xfl"
    first = xflwb.Workbench(data_dir=data, port=0).start()
    try:
        again = xflwb.Workbench(data_dir=data, port=0)
        with pytest.raises(BackendRunning) as exc:
            again.start()
        msg = str(exc.value)
        assert first.url in msg and f"pid {os.getpid()}, this process" in msg, msg
        assert "use it, or stop it first" in msg
        assert not again.running
        assert xflwb.Workbench.running_for(data) is first
        # another process is refused too, and told where the running one is
        code = (f"import xflwb\ntry:\n    xflwb.Workbench(data_dir={str(data)!r}, port=0)"
                f".start()\nexcept OSError as e:\n    print('REFUSED', e)\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120)
        assert proc.stdout.startswith("REFUSED"), (proc.stdout, proc.stderr[-2000:])
        assert first.url in proc.stdout and f"pid {os.getpid()})" in proc.stdout
        other = xflwb.Workbench(data_dir=tmp_path / "other", port=0).start()  # another dir
        other.stop()
    finally:
        first.stop()
    assert not (data / RECORD_FILE).exists()
    xflwb.Workbench(data_dir=data, port=0).start().stop()  # stopped: the dir is free again


def test_a_killed_backends_record_is_stale_and_ignored(tmp_path):
    """A backend SIGKILLed while serving leaves its record behind; the next start serves
    the directory (the lock died with the process)."""
    data = tmp_path / "xfl"
    code = (f"import time, xflwb\nwb = xflwb.Workbench(data_dir={str(data)!r}, port=0)"
            ".start()\nprint('SERVING', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("SERVING"), proc.stderr.read()[-2000:]
        record = json.loads((data / RECORD_FILE).read_text())
        assert record["pid"] == proc.pid and record["url"].startswith("http://")
    finally:
        proc.kill()
        proc.wait()
    wb = xflwb.Workbench(data_dir=data, port=0).start()
    try:
        assert json.loads((data / RECORD_FILE).read_text())["pid"] == os.getpid()
    finally:
        wb.stop()


def test_xfl_server_start_attaches_to_this_kernels_backend_and_masks_the_token(ip, tmp_path,
                                                                               capsys):
    from xflwb.magics import state_of, status_html

    data = tmp_path / "xfl"
    wb = xflwb.Workbench(data_dir=data, port=0).start()
    before = state_of(ip).workbench
    try:
        got = ip.run_line_magic("xfl_server", f"start --port 0 --data-dir {data}")
        assert got is wb and ip.user_ns["xfl_wb"] is wb
        assert "attached" in capsys.readouterr().out
        page = status_html(wb, [])
        assert wb.admin_token not in page  # a notebook's outputs get shared
        assert f"…{wb.admin_token[-4:]}" in page and "xfl_wb.admin_token" in page
    finally:
        state_of(ip).workbench = before
        wb.stop()
