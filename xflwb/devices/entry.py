"""One virtual phone as a process of its own: ``python -m xflwb.devices``.

A ``Fleet`` launches each device through this entry point; the ``xflwb device`` command
is the same parser and the same ``run``, so a phone started by hand behaves as a fleet's.
The device rewrites its JSON status file (``--status-file``) atomically on every change;
the fleet reads it back, ignoring files of another run (``--run-id``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from xflwb._argparse import Parser
from xflwb._options import add_arguments, given
from xflwb.bridge.params import PLATFORMS
from xflwb.devices.device import DeviceOptions
from xflwb.devices.fleet import FleetOptions


def add_device_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of one device process (``python -m xflwb.devices``, ``xflwb device``)."""
    p.add_argument("--backend", required=True, help="backend URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--platform", required=True, choices=list(PLATFORMS))
    add_arguments(p, FleetOptions, only=("dataset", "partition", "data_type", "seed"))
    add_arguments(p, DeviceOptions)
    p.add_argument("--num-partitions", type=int, default=1)
    p.add_argument("--partition-id", type=int, default=0)
    p.add_argument("--device-id", type=int, default=1)
    p.add_argument("--partition-file", default=None,
                   help="every device's rows of the dataset (.npz, arr_0 … arr_{n-1}), as a "
                   "fleet computes them once for all its devices; default: partition here")
    p.add_argument("--cache-dir", default=".xfl-cache")
    p.add_argument("--status-file", default=None, help="JSON status, rewritten on change")
    p.add_argument("--run-id", default=None, help="written into the status file (a fleet "
                   "reads only its own run's files)")
    return p


def build_parser(prog: str = "python -m xflwb.devices") -> argparse.ArgumentParser:
    return add_device_arguments(Parser(prog=prog, description="run one virtual phone "
                                       "(FedKit client flow)"))


def _read_indices(path: str | None) -> list[Any] | None:
    """The rows a fleet computed for its devices (``--partition-file``), or None."""
    if path is None:
        return None
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            return [f[f"arr_{k}"] for k in range(len(f.files))]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"--partition-file {path}: not a fleet's partition file ({exc}); "
                         "leave it out to partition here") from None


def run(args: argparse.Namespace, prog: str = "xflwb device") -> int:
    """One virtual phone following FedKit's client flow (exit 0 when its session ends,
    1 when it failed, 2 for bad arguments)."""
    import json
    import logging
    import os
    import signal

    from xflwb import _lifeline
    from xflwb._plain_logs import plain_logs
    from xflwb.devices.device import TOKEN_ENV, Device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    plain_logs()  # its output is a log file: no colour codes
    from xflwb.devices.partition import device_data

    try:
        spec = FleetOptions(android=1, **given(args, FleetOptions))
        options = DeviceOptions(**given(args, DeviceOptions), seed=spec.seed,
                                token=os.environ.get(TOKEN_ENV) or None)
        data = device_data(spec.dataset, spec.partition, args.num_partitions,
                           args.partition_id, seed=spec.seed,
                           indices=_read_indices(args.partition_file))
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    def write_status(status: Any) -> None:  # atomic, so a reader never sees half a file
        if args.status_file:
            from dataclasses import asdict

            tmp = f"{args.status_file}.tmp"
            with open(tmp, "w") as f:  # run_id: the fleet reads only its own run's files
                json.dump({**asdict(status), "id": status.device_id, "run_id": args.run_id}, f)
            os.replace(tmp, args.status_file)

    device = Device(args.backend, args.platform, spec.data_type or spec.dataset,
                    data.x_train, data.y_train, data.x_test, data.y_test,
                    device_id=args.device_id, cache_dir=args.cache_dir, options=options,
                    on_status=write_status)
    signal.signal(signal.SIGTERM, lambda *_: device.stop())
    _lifeline.install()  # stop when the kernel (or fleet owner) that started us dies
    write_status(device.status)
    status = device.run()
    print(f"device {status.device_id} ({status.platform}): {status.status}, "
          f"{status.rounds_done} rounds" + (f", error: {status.error}" if status.error else ""),
          flush=True)
    return 1 if status.status == "failed" else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xflwb.devices --backend URL --platform android|ios [...]``."""
    return run(build_parser().parse_args(argv), prog="python -m xflwb.devices")
