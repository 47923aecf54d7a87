"""Fleets: many virtual phones, each in its own process (``python -m xflwb.devices``).

A process per device keeps phones independent like real ones: one can be killed (SIGKILL)
without touching the others, and the TFLite interpreter / Core ML executor of each runs in
its own interpreter. Each device writes its status to a JSON file the fleet reads; the file
carries the fleet's run id, so a fleet never shows another run's (another kernel's) devices.
Devices end with the process that started them (``xflwb._lifeline``), and run in their own
session, so an interrupt of the kernel (JupyterLab's Stop) does not reach them.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xflwb import _lifeline, _options
from xflwb._options import option
from xflwb.errors import InputError

if TYPE_CHECKING:  # pandas loads with the first table, not in every phone's start-up
    import pandas as pd

#: the module each device process runs (``python -m``; ``xflwb.devices.entry``)
DEVICE_MODULE = "xflwb.devices"

COLUMNS = ["id", "platform", "status", "partition", "train_size", "test_size", "rounds_done",
           "last_loss", "last_accuracy", "drops", "error"]


def _per_device(value: Any, n: int, name: str) -> list[Any]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise InputError(f"{name} lists {len(value)} values for {n} devices")
        return list(value)
    return [value] * n


def new_run_id() -> str:
    """A unique id per spawn: sortable by time, random so two kernels never share one."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


_ERROR_LINE = re.compile(r"error|exception|traceback", re.IGNORECASE)


def last_error_line(text: str) -> str | None:
    """The line of a log most likely to say why a process died: the last one naming an
    error (a traceback ends with it), else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.search(line):
            return line[:500]
    return lines[-1][:500] if lines else None


def exit_reason(returncode: int, log_text: str) -> str:
    """``exited with code 2: <last error line>``, or ``killed by SIGKILL`` (a killed
    process wrote nothing about it, so its log's last error would be an older one)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    line = last_error_line(log_text)
    return f"exited with code {returncode}: {line}" if line else f"exited with code {returncode}"


def check_spawn(dataset: str, data_type: str) -> None:
    """Refuse devices whose dataset the model this process exported for ``data_type`` cannot
    train on: unpublished, no backend knows it yet, and the devices would wait forever.

    The export is the one this process made last for ``data_type`` and still holds (see
    ``xflwb.bridge.export.latest_export``); a process that exported nothing has none.
    """
    exporter = sys.modules.get("xflwb.bridge.export")  # no export imported: none made
    res = exporter.latest_export(data_type) if exporter is not None else None
    if res is None:
        return
    from xflwb.devices.datasets import IncompatibleData, check_compatible

    try:
        check_compatible(res.manifest, dataset)
    except IncompatibleData as exc:
        raise IncompatibleData(
            f"{exc} (model {res.name!r} v{res.version} was exported in this process for "
            f"data type {data_type!r}; no device was started)") from None


@_options.declared  # unknown keywords: did you mean
@dataclass
class FleetOptions:
    """Which virtual phones to start, on what data: ``wb.spawn_devices`` and ``%xfl_devices
    spawn`` take these (``xflwb device``, one phone, the data ones)."""

    android: int = option(0, "Android devices (run the .tflite)", ge=0)
    ios: int = option(0, "iOS devices (run the .mlmodel in the Core ML executor)", ge=0)
    dataset: str = option("digits", "dataset the devices train on (see "
                          "xflwb.devices.datasets.SPECS)")
    partition: str = option("iid", "how the dataset is split: iid | dirichlet:ALPHA | "
                            "shards:K")
    data_type: str | None = option(None, "data type the devices ask the backend for "
                                   "(default: the dataset's name)")
    seed: int = option(0, "seed of the partitions and the devices' dropouts")

    def __post_init__(self) -> None:
        from xflwb.devices.partition import parse

        _options.check(self)
        if self.android + self.ios == 0:
            raise InputError(f"ask for at least one device (android={self.android}, "
                             f"ios={self.ios})")
        parse(self.partition)  # fail now, not in n processes


class Fleet:
    """Android and iOS virtual devices on partitions of one dataset."""

    def __init__(self, backend_url: str, workdir: str | Path, *, first_device_id: int = 1,
                 run_id: str | None = None, tokens: Sequence[str] | None = None,
                 **options: Any) -> None:
        """``options``: ``FleetOptions``, and ``DeviceOptions`` knobs, each one value or one
        per device (``slowdown=[1, 1, 10]``)."""
        from xflwb.devices.device import DeviceOptions

        _options.unknown((FleetOptions, DeviceOptions), options, "Fleet")
        fleet_names = _options.names(FleetOptions)
        spec = FleetOptions(**{k: v for k, v in options.items() if k in fleet_names})
        n = spec.android + spec.ios
        knobs = {k: _per_device(v, n, k) for k, v in options.items() if k not in fleet_names}
        # every device's knobs are checked now, not in n processes
        for k in range(n):
            DeviceOptions(**{name: values[k] for name, values in knobs.items()})
        self.url = backend_url
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.platforms = ["android"] * spec.android + ["ios"] * spec.ios
        self.dataset, self.partition, self.seed = spec.dataset, spec.partition, spec.seed
        self.data_type = spec.data_type or spec.dataset
        self.knobs = knobs
        #: one device token per device (passed in each process's environment, never on its
        #: command line)
        if tokens is not None and len(tokens) != n:
            raise InputError(f"tokens lists {len(tokens)} tokens for {n} devices")
        self._tokens = list(tokens) if tokens is not None else None
        self.ids = list(range(first_device_id, first_device_id + n))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        #: written into every status file of this run; the table ignores any other file
        self.run_id = run_id or new_run_id()
        self._log_start: dict[int, int] = {}  # where this run's output begins in each log

    def _status_file(self, device_id: int) -> Path:
        return self.workdir / f"device-{device_id}.json"

    def _log_file(self, device_id: int) -> Path:
        return self.workdir / f"device-{device_id}.log"

    def _own_status(self, device_id: int) -> dict[str, Any] | None:
        """The device's status file, if a process of this run wrote it."""
        with contextlib.suppress(OSError, json.JSONDecodeError):
            data = json.loads(self._status_file(device_id).read_text())
            if isinstance(data, dict) and data.get("run_id") == self.run_id:
                return data
        return None

    def _own_log(self, device_id: int) -> str:
        """This run's part of the device's log."""
        with contextlib.suppress(OSError), open(self._log_file(device_id), "rb") as f:
            f.seek(self._log_start.get(device_id, 0))
            return f.read()[-20000:].decode("utf-8", "replace")
        return ""

    def _write_indices(self, n: int) -> Path | None:
        """Every device's rows of the dataset, computed once here and written for the
        devices to read (``--partition-file``), instead of each device partitioning the
        whole dataset itself (``dataset_indices``); None for synthetic data, and for data
        that cannot be split so: each device then fails saying why, in its own log."""
        import numpy as np

        from xflwb.devices.partition import dataset_indices

        try:
            indices = dataset_indices(self.dataset, self.partition, n, self.seed)
        except InputError:
            return None
        if indices is None:
            return None
        path = self.workdir / f"partitions-{self.run_id}.npz"  # this run's own file
        with open(path, "wb") as f:
            np.savez(f, *indices)
        return path

    def start(self) -> Fleet:
        check_spawn(self.dataset, self.data_type)
        n = len(self.platforms)
        indices = self._write_indices(n)
        for k, (device_id, platform) in enumerate(zip(self.ids, self.platforms, strict=True)):
            cmd = [sys.executable, "-m", DEVICE_MODULE, "--backend", self.url,
                   "--platform", platform, "--data-type", self.data_type,
                   "--dataset", self.dataset, "--partition", self.partition,
                   "--num-partitions", str(n), "--partition-id", str(k),
                   "--seed", str(self.seed), "--device-id", str(device_id),
                   "--cache-dir", str(self.workdir / "cache"),
                   "--status-file", str(self._status_file(device_id)),
                   "--run-id", self.run_id]
            if indices is not None:
                cmd += ["--partition-file", str(indices)]
            for knob, values in self.knobs.items():  # DeviceOptions: the same flags
                cmd += [f"--{knob.replace('_', '-')}", str(values[k])]
            env = _lifeline.child_env()
            if self._tokens is not None:
                from xflwb.devices.device import TOKEN_ENV

                env = {**env, TOKEN_ENV: self._tokens[k]}
            log = open(self._log_file(device_id), "ab")  # noqa: SIM115
            self._log_start[device_id] = log.tell()
            # its own session: the notebook's Stop (SIGINT to the kernel's process group)
            # must not kill the phones; the lifeline still ends them with the kernel
            self.procs[device_id] = proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
            log.close()
            _lifeline.reap(proc)  # no <defunct> entry once it exits
        return self

    # -- views ------------------------------------------------------------------------------
    def statuses(self) -> list[dict[str, Any]]:
        rows = []
        for k, (device_id, platform) in enumerate(zip(self.ids, self.platforms, strict=True)):
            row = {"id": device_id, "platform": platform, "status": "starting",
                   "partition": k}
            data = self._own_status(device_id)
            if data is not None:
                row.update({c: data.get(c) for c in COLUMNS if c in data and c != "id"})
            proc = self.procs.get(device_id)
            if proc is not None and proc.poll() is not None and row["status"] not in (
                    "finished", "failed", "no session"):
                # died without a final word (at startup, a crash, a kill): say how and why
                row["status"] = "failed"
                row["error"] = exit_reason(proc.returncode, self._own_log(device_id))
            rows.append(row)
        return rows

    @property
    def table(self) -> pd.DataFrame:
        """id, platform, status, partition, train/test sizes, rounds done, last loss/acc."""
        import pandas as pd

        return pd.DataFrame(self.statuses(), columns=COLUMNS)

    def __repr__(self) -> str:
        from collections import Counter

        counts = dict(Counter(r["status"] for r in self.statuses()).most_common())
        return f"Fleet({len(self.ids)} devices: {counts})"

    # -- control ----------------------------------------------------------------------------
    def alive(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.poll() is None]

    def kill(self, device_id: int, sig: int = signal.SIGKILL) -> None:
        """Kill one device process (e.g. to test robustness).

        Through ``Popen``: once the process has been reaped its pid may belong to another
        process (pids wrap at 32768 on small machines), which a bare ``os.kill`` would hit."""
        self.procs[device_id].send_signal(sig)

    def wait(self, timeout: float | None = None) -> pd.DataFrame:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.alive():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"devices {self.alive()} still running after {timeout} s")
            time.sleep(0.2)
        return self.table

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate every device process and reap it: nothing is left behind."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
