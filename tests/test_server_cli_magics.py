"""`xflwb server` in the foreground and the %xfl_server / %xfl_train magics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import keras
import pytest

import xflwb
from tests.support import wait_until
from xflwb.magics import XflMagicError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
    return xflwb.export(model, name="tiny", data_type="tiny-data",
                        out_dir=tmp_path_factory.mktemp("e"))


def test_cli_server_serves_and_stops_on_sigterm(export, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "xflwb", "server", "--port", "0", "--data-dir",
         str(tmp_path / "d"), "--admin-token", "tok", "--publish", str(export.directory)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []

        def backend_url() -> str | None:
            lines.append(line := proc.stdout.readline())
            return (m := re.search(r"backend at (http://\S+)", line)) and m.group(1)

        url = wait_until(backend_url, 60, "the 'backend at' line", describe=lambda: lines)
        assert any("published tiny v1" in x for x in lines)
        ad = httpx.post(f"{url}/train/advertised", json={"data_type": "tiny-data"})
        assert ad.status_code == 200 and ad.json()["name"] == "tiny"
        assert httpx.get(f"{url}/api/v1/models",
                         headers={"Authorization": "Bearer tok"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped" in out
    assert "(admin token: …, as given)" in "".join(lines)  # never printed whole
    assert not (tmp_path / "d" / "admin_token").exists()  # a given token stays where it was


def test_cli_server_keeps_a_generated_admin_token_in_a_private_file(tmp_path):
    """A generated admin token is never printed whole (terminal output is logged and
    shared): the line names the file holding it, readable by its owner only."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "xflwb", "server", "--port", "0", "--data-dir",
         str(tmp_path / "d")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "XFLWB_ADMIN_TOKEN"})
    try:
        found = wait_until(lambda: re.search(r"backend at (http\S+)", proc.stdout.readline()),
                           60, "the 'backend at' line")
        line, url = found.string, found.group(1)
        path = tmp_path / "d" / "admin_token"
        token = path.read_text().strip()
        ok = httpx.get(f"{url}/api/v1/models", headers={"Authorization": f"Bearer {token}"})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert len(token) >= 16 and token not in line, line
    assert f"…{token[-4:]}, whole in {path}" in line
    assert path.stat().st_mode & 0o777 == 0o600
    assert ok.status_code == 200


def test_cli_server_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "xflwb", "server", "--port", str(port),
                               "--data-dir", str(tmp_path)], capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode == 2
    assert "pass port=0" in proc.stderr


def test_server_and_train_magics(ip, export, tmp_path, capsys):
    ip.user_ns["tiny_export"] = export
    wb = ip.run_line_magic("xfl_server", f"start --port 0 --data-dir {tmp_path / 'm'}")
    try:
        assert wb.running and ip.user_ns["xfl_wb"] is wb
        assert "xflwb backend at http://127.0.0.1:" in capsys.readouterr().out
        session = ip.run_line_magic("xfl_train", "tiny_export --rounds 1 --min-clients 1 "
                                                 "--local-epochs 2")
        assert session.status == "running" and ip.user_ns["tiny_session"] is session
        assert session.info["config"]["local_epochs"] == 2
        table = ip.run_line_magic("xfl_server", "status")
        assert list(table.model) == ["tiny"]
        ip.run_line_magic("xfl_train", "--help")
        helptext = capsys.readouterr().out
        assert "--rounds" in helptext and "--strategy" in helptext
        with pytest.raises(XflMagicError, match="rounds must be a positive integer"):
            ip.run_line_magic("xfl_train", "tiny --rounds 0")
        with pytest.raises(XflMagicError, match="no published model named 'unknown_model'"):
            ip.run_line_magic("xfl_train", "unknown_model")
        # FedBuff's options travel as --strategy-options JSON, checked before any process
        with pytest.raises(XflMagicError, match="did you mean 'buffer_size'"):
            ip.run_line_magic("xfl_train", "tiny_export --strategy fedbuff "
                                           "--strategy-options '{\"bufer_size\": 2}'")
        session.stop()  # one session per model at a time
        asynchronous = ip.run_line_magic(
            "xfl_train", "tiny_export --rounds 2 --min-clients 1 --strategy fedbuff "
                         "--strategy-options '{\"buffer_size\": 2, \"max_staleness\": 3}'")
        config = asynchronous.info["config"]
        assert config["strategy"] == "fedbuff"
        assert config["strategy_options"]["buffer_size"] == 2
        assert config["strategy_options"]["staleness"] == "polynomial:0.5"  # filled in
        assert "model version" in asynchronous.doing()  # not "round"
    finally:
        ip.run_line_magic("xfl_server", "stop")
    assert not wb.running
    with pytest.raises(XflMagicError, match="no xflwb backend is running"):
        ip.run_line_magic("xfl_train", "tiny")
    assert os.path.exists(tmp_path / "m" / "xflwb.db")


def test_two_shells_keep_their_own_backend_and_fleets(ip, tmp_path):
    """The magics' state lives in each shell's registered magics (no class attribute): a
    backend started in one shell is not another's, and a shell's fleets are its workbench's
    own list (``wb.fleets``), tracked once."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from xflwb.magics import register, state_of

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    other = InteractiveShell(config=config)
    other.run_line_magic("load_ext", "xflwb")
    assert state_of(other) is not state_of(ip)
    wb = ip.run_line_magic("xfl_server", f"start --port 0 --data-dir {tmp_path / 'a'}")
    try:
        assert state_of(ip).workbench is wb and state_of(other).workbench is None
        with pytest.raises(XflMagicError, match="no xflwb backend is running"):
            other.run_line_magic("xfl_devices", "spawn --android 1")
        ip.run_line_magic("xfl_devices", "spawn --android 1 --dataset digits --max-wait 1")
        assert wb.fleets == [ip.user_ns["xfl_fleet"]] == state_of(ip).fleets
        assert len(ip.run_line_magic("xfl_devices", "list")) == 1
        assert other.run_line_magic("xfl_devices", "list") is None
        assert "xfl_fleet" not in other.user_ns and "xfl_wb" not in other.user_ns
        ip.run_line_magic("xfl_devices", "stop")
        assert wb.fleets == [] and ip.run_line_magic("xfl_devices", "list") is None
        kept = state_of(ip)
        register(ip)  # registering again (%reload_ext) keeps the shell's state
        assert state_of(ip) is kept and kept.workbench is wb
    finally:
        ip.run_line_magic("xfl_server", "stop")
    assert not wb.running and state_of(ip).fleets == []


def test_status_html_has_url_token_and_qr(tmp_path):
    from xflwb.magics import status_html

    with xflwb.Workbench(data_dir=tmp_path, port=0, admin_token="tok") as wb:
        page = status_html(wb, [])
        assert wb.url in page and "tok" in page and "<svg" in page
    wild = xflwb.Workbench(data_dir=tmp_path / "w", host="0.0.0.0", port=0).start()
    try:
        assert "0.0.0.0" not in wild.url  # phones get a dialable address
        assert httpx.get(wild.url + "/openapi.json").status_code == 200
    finally:
        wild.stop()


def _add(tensors, _round):
    return [t + 0.01 for t in tensors]


def test_cli_train_starts_a_session_through_the_admin_api_and_follows_it(export, tmp_path):
    """``xflwb train`` sends the session options (the one declaration) to a running
    backend's admin API, publishes an export directory first, and ``--wait`` follows the
    session to its end, writing the history CSV."""
    from tests.wirephone import WirePhone

    with xflwb.Workbench(data_dir=tmp_path / "x", port=0, admin_token="tok") as wb:
        base = [sys.executable, "-m", "xflwb", "train", "--url", wb.url]
        # bad options and a wrong token are refused before anything runs
        bad = subprocess.run([*base, "--admin-token", "tok", str(export.directory),
                              "--rounds", "0"], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "rounds must be a positive integer" in bad.stderr
        typo = subprocess.run([*base, "--admin-token", "tok", str(export.directory),
                               "--strategy", "fedbuff", "--strategy-options",
                               '{"bufer_size": 2}'], capture_output=True, text=True,
                              timeout=120)
        assert typo.returncode == 2 and "did you mean 'buffer_size'" in typo.stderr
        wrong = subprocess.run([*base, "--admin-token", "nope", str(export.directory)],
                               capture_output=True, text=True, timeout=120)
        assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr
        assert wb.session_table.empty
        out = tmp_path / "hist.csv"
        env = {**os.environ, "XFLWB_ADMIN_TOKEN": "tok"}
        proc = subprocess.Popen([*base, str(export.directory), "--rounds", "2",
                                 "--min-clients", "2", "--local-epochs", "3", "--wait",
                                 "--out", str(out), "--no-progress", "--timeout", "200"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
        try:
            def started() -> bool:
                if not wb.session_table.empty:
                    return True
                if proc.poll() is not None:  # gone: no session will come
                    pytest.fail(f"xflwb train exited early: {proc.communicate()}")
                return False

            wait_until(started, 120, "xflwb train to start a session")
            phones = [WirePhone(wb.url, p, "tiny-data", _add, device_id=i)
                      for i, p in enumerate(("android", "ios"))]
            threads = [p.start() for p in phones]
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        for t in threads:
            t.join(30)
        assert proc.returncode == 0, stderr[-2000:]
        assert re.search(r"session \d+ of tiny: started fresh", stdout)
        assert "finished, round 2" in stdout
        # the bytes each way per platform (no compression asked: no ratio line)
        assert re.search(r"bytes on the wire \(totals\):\n *platform +bytes up +bytes down"
                         r".*\n *android +[\d.]+ [kM]?B +[\d.]+ [kM]?B", stdout), stdout
        assert "compression vs float32" not in stdout
        session = wb.session(int(wb.session_table.id.iloc[0]))
        assert session.info["config"]["local_epochs"] == 3  # the options arrived
        hist = __import__("pandas").read_csv(out)
        assert set(hist["round"]) == {1, 2} and {"android", "ios"} <= set(hist.platform)
