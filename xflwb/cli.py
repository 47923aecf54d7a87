"""The ``xflwb`` command: parses arguments and delegates to the public API."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xflwb._argparse import Parser
from xflwb._export_options import add_export_options, add_verbose, export_kwargs

DESCRIPTION = """\
xflwb: cross-platform federated learning on phones, from a notebook or this command.

Export a Keras model as a trainable TFLite model (Android) and an updatable Core ML model
(iOS) that provably compute the same thing, serve both from a bundled backend with a real
Flower server, and train on real phones, virtual phones, or Flower's Simulation Engine."""

EPILOG = """\
examples:
  xflwb demo                       export, serve, 2 Android + 2 iOS virtual phones, train
  xflwb export mymodels:build_cnn --name cnn --data-type digits --lr 0.05
  xflwb server --port 8000 --publish artifacts/cnn/v1 --auto-start
  xflwb simulate artifacts/cnn/v1 --android 50 --ios 50 --rounds 5 --out runs/sim.csv
  xflwb experiment run experiments/fedavg_digits.ipynb --out runs/a -p rounds 2

'xflwb COMMAND --help' describes a command's options. TensorFlow's log lines are hidden;
--verbose shows them. In a notebook: %load_ext xflwb (see the README)."""


def resolve_model(target: str) -> Any:
    """``package.module:attr`` → a Keras model (``attr`` may be a zero-argument factory)."""
    if ":" not in target:
        raise SystemExit(f"expected module:attr, got {target!r}")
    mod_name, attr = target.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SystemExit(f"cannot import {mod_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    import keras

    if callable(obj) and not isinstance(obj, keras.Model):
        obj = obj()
    return obj


def cmd_export(args: argparse.Namespace) -> int:
    import xflwb

    model = resolve_model(args.target)
    name = args.name or args.target.split(":", 1)[1].replace(".", "_")
    try:
        res = xflwb.export(model, name=name, **export_kwargs(args))
    except (xflwb.ExportError, xflwb.ParityError, ValueError, TypeError) as exc:
        print(f"xflwb export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {res.name} v{res.version} → {res.directory}")
    for plat, path in res.paths.items():
        print(f"  {plat:9s} {path}")
    for w in res.warnings:
        print(f"warning: {w}")
    print(res.parity.drop(columns=["note"]).to_string(index=False))
    return 0 if bool(res.parity["ok"].all()) else 1


def cmd_server(args: argparse.Namespace) -> int:
    """Run the backend in the foreground until Ctrl-C / SIGTERM."""
    import signal
    import threading

    import xflwb

    try:
        tls = _server_tls(args)
        wb = xflwb.Workbench(data_dir=args.data_dir, host=args.host, port=args.port,
                             db_url=args.db_url, admin_token=args.token, tls=tls,
                             device_auth=args.device_auth,
                             auto_start=args.auto_start, max_body_bytes=args.max_body_bytes,
                             allow_phone_start_fresh=args.allow_phone_start_fresh)
        wb.start()
    except (OSError, ValueError) as exc:
        print(f"xflwb server: error: {exc}", file=sys.stderr)
        return 2
    for path in args.publish or []:
        try:
            m = wb.publish(path)
            print(f"published {m['name']} v{m['version']} ({m['data_type']})")
        except (ValueError, FileNotFoundError) as exc:
            print(f"xflwb server: cannot publish {path}: {exc}", file=sys.stderr)
    print(f"xflwb backend at {wb.url}  (admin token: {wb.admin_token})", flush=True)
    if wb.tls is not None:
        print(f"TLS: {wb.tls.cert}; phones trust {wb.tls.ca_file} (SHA-256 "
              f"{wb.tls.fingerprint})", flush=True)
    for warning in wb.security_warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    finally:
        wb.stop()
        print("xflwb backend stopped", flush=True)
    return 0


def _server_tls(args: argparse.Namespace) -> Any:
    """``--tls-cert/--tls-key[/--tls-ca]`` or ``--dev-tls DIR`` as ``Workbench(tls=...)``."""
    if args.dev_tls and (args.tls_cert or args.tls_key):
        raise ValueError("pass either --dev-tls DIR or --tls-cert/--tls-key, not both")
    if args.dev_tls:
        from xflwb.server.security import make_dev_ca
        from xflwb.workbench import reachable_host

        # the address phones dial: the bind address, or this machine's for a wildcard
        hosts = ["127.0.0.1", "localhost", "::1", reachable_host(args.host)]
        return make_dev_ca(args.dev_tls, hosts=hosts + list(args.tls_host or []))
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together (the PEM certificate chain and "
                         "its private key)")
    if args.tls_cert:
        return (args.tls_cert, args.tls_key, *([args.tls_ca] if args.tls_ca else []))
    return None


def cmd_token(args: argparse.Namespace) -> int:
    """Issue, list or revoke device tokens in the registry a backend serves from."""
    from xflwb.server.registry import Registry
    from xflwb.server.security import TokenStore

    registry = Registry(args.data_dir, args.db_url)
    try:
        store = TokenStore(registry.engine)
        if args.action == "issue":
            if not args.device:
                print("xflwb token issue: error: name the device, e.g. xflwb token issue "
                      "pixel-7", file=sys.stderr)
                return 2
            try:
                row = store.issue(args.device)
            except ValueError as exc:
                print(f"xflwb token issue: error: {exc}", file=sys.stderr)
                return 2
            print(f"token for {row['device']} (id {row['id']}; shown once): {row['token']}")
        elif args.action == "list":
            import time as _time

            for row in store.list():
                state = ("revoked " + _time.strftime("%Y-%m-%d %H:%M",
                                                     _time.localtime(row["revoked"]))
                         if row["revoked"] else "active")
                print(f"{row['id']:>5}  {row['device']:<32} {state}")
        else:
            if not args.device:
                print("xflwb token revoke: error: name the device or token id",
                      file=sys.stderr)
                return 2
            target: Any = int(args.device) if args.device.isdigit() else args.device
            n = store.revoke(target)
            print(f"revoked {n} token(s) of {args.device}")
            if not n:
                return 1
    finally:
        registry.close()
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    """One virtual phone following FedKit's client flow (exit 0 when its session ends)."""
    import json
    import logging
    import os
    import signal

    from xflwb import _lifeline
    from xflwb.devices.device import TOKEN_ENV, Device, DeviceOptions

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from xflwb.devices.partition import device_data

    try:
        options = DeviceOptions(slowdown=args.slowdown, join_delay=args.join_delay,
                                drop_prob=args.drop_prob, rejoin_delay=args.rejoin_delay,
                                network_delay=args.network_delay, encoding=args.encoding,
                                max_wait=args.max_wait, seed=args.seed,
                                ca_file=args.ca_file, token=os.environ.get(TOKEN_ENV) or None)
        data = device_data(args.dataset, args.partition, args.num_partitions,
                           args.partition_id, seed=args.seed)
    except ValueError as exc:
        print(f"xflwb device: error: {exc}", file=sys.stderr)
        return 2

    def write_status(status) -> None:  # atomic, so a reader never sees half a file
        if args.status_file:
            from dataclasses import asdict

            tmp = f"{args.status_file}.tmp"
            with open(tmp, "w") as f:  # run_id: the fleet reads only its own run's files
                json.dump({**asdict(status), "id": status.device_id, "run_id": args.run_id}, f)
            os.replace(tmp, args.status_file)

    device = Device(args.backend, args.platform, args.data_type or args.dataset,
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


def cmd_experiment(args: argparse.Namespace) -> int:
    from xflwb import experiment

    try:
        params = {k: experiment.parse_value(v) for k, v in (args.parameter or [])}
        grid = experiment.parse_grid(args.grid or [])
        df = experiment.run(args.notebook, args.out, params, grid, kernel_name=args.kernel,
                            progress=False)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        print(f"xflwb experiment: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a cell of the run raised (papermill): the run failed
        if type(exc).__name__ != "PapermillExecutionError":
            raise
        cell, name, value = (getattr(exc, k, "?") for k in ("exec_count", "ename", "evalue"))
        print(f"xflwb experiment: error: the run failed in cell {cell}: {name}: {value} "
              f"(executed notebook in {args.out})", file=sys.stderr)
        return 1
    print(f"{df['run'].nunique()} run(s); results in {Path(args.out) / 'results.csv'}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from xflwb.simulation import simulate

    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        print(f"xflwb simulate: error: {out} exists; results are never overwritten",
              file=sys.stderr)
        return 2
    try:
        session = simulate(args.model, android=args.android, ios=args.ios,
                           dataset=args.dataset, partition=args.partition, rounds=args.rounds,
                           strategy=args.strategy, fraction_fit=args.fraction_fit,
                           fraction_evaluate=args.fraction_evaluate,
                           min_clients=args.min_clients, local_epochs=args.local_epochs,
                           seed=args.seed, drop_prob=args.drop_prob,
                           ray_address=args.ray_address,
                           data_dir=args.data_dir, wait=False)
    except (ValueError, RuntimeError) as exc:
        print(f"xflwb simulate: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    from xflwb import _console

    try:  # a round progress bar on stderr while the simulation's own process trains
        status = _console.wait(session, args.rounds, timeout=args.timeout,
                               progress=not args.no_progress)
    except (TimeoutError, KeyboardInterrupt) as exc:
        session.stop()  # this command started it: it does not outlive the command
        print(f"xflwb simulate: error: {str(exc) or 'interrupted'}; stopped simulation "
              f"{session.id}", file=sys.stderr)
        return 1
    if status != "finished":
        log = session.registry.data_dir / "logs" / f"session-{session.id}.log"
        print(f"xflwb simulate: error: simulation {session.id} {status}: "
              f"{session.info.get('error') or 'no reason recorded'} (log: {log})",
              file=sys.stderr)
        return 1
    hist = session.history
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        hist.to_csv(out, index=False)
    last = hist[hist["round"] == hist["round"].max()]
    wide = last.pivot_table(index="platform", columns="metric", values="value")
    keep = [c for c in ("clients", "examples", "eval_loss", "accuracy") if c in wide.columns]
    print(f"simulation {session.id}: {session.status}, round {session.round}")
    print(_console.format_table(wide[keep], index=True))
    if out is not None:
        print(f"history in {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from xflwb import demo

    if args.local_only:
        demo.run(out=args.out, epochs=args.epochs, seed=args.seed, model=args.model)
        return 0
    result = demo.run_federated(out=args.out, rounds=args.rounds, seed=args.seed,
                                model=args.model)
    return 0 if result["status"] == "finished" else 1


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="xflwb", description=DESCRIPTION, epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose(p, default=False)
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    e = sub.add_parser("export", help="export a Keras model for Android and iOS")
    e.add_argument("target", help="module:attr naming a Keras model or a factory")
    e.add_argument("--name", default=None, help="model name (default: attr)")
    add_export_options(e)
    e.set_defaults(func=cmd_export)
    s = sub.add_parser("server", help="run the backend (HTTP API + sessions) in the foreground")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--data-dir", default="xfl-data")
    s.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: SQLite in data dir)")
    s.add_argument("--token", default=None, help="admin bearer token (default: "
                   "$XFLWB_ADMIN_TOKEN or a random one, printed)")
    s.add_argument("--auto-start", action="store_true",
                   help="start a default session when a phone asks for a server")
    s.add_argument("--allow-phone-start-fresh", action="store_true",
                   help="honour a phone's start_fresh (default: ignored and logged, so a "
                        "phone cannot throw away checkpointed progress)")
    s.add_argument("--publish", action="append", metavar="EXPORT_DIR",
                   help="publish an export directory at start (repeatable)")
    s.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                   help="largest HTTP request body, 413 above (default: twice the largest "
                        "published model plus 1 MiB)")
    s.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve HTTPS and gRPC over TLS with this certificate (chain)")
    s.add_argument("--tls-key", default=None, metavar="PEM", help="its private key")
    s.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="the CA that signed it (default: the certificate itself)")
    s.add_argument("--dev-tls", default=None, metavar="DIR",
                   help="make (or reuse) a development CA and certificate in DIR and serve "
                        "TLS with them (phones trust DIR/ca.pem)")
    s.add_argument("--tls-host", action="append", metavar="HOST",
                   help="with --dev-tls: another name or address phones dial (repeatable)")
    s.add_argument("--device-auth", default=None, choices=["token"],
                   help="enroll devices: phones present a token from `xflwb token issue` "
                        "(default: open, as FedKit's backend)")
    s.set_defaults(func=cmd_server)
    t = sub.add_parser("token", help="issue, list or revoke device tokens (--device-auth "
                                     "token)")
    t.add_argument("action", choices=["issue", "list", "revoke"])
    t.add_argument("device", nargs="?", default=None,
                   help="device name (issue, revoke) or token id (revoke)")
    t.add_argument("--data-dir", default="xfl-data")
    t.add_argument("--db-url", default=None, help="SQLAlchemy URL (default: SQLite in data dir)")
    t.set_defaults(func=cmd_token)
    v = sub.add_parser("device", help="run one virtual phone (FedKit client flow)")
    v.add_argument("--backend", required=True, help="backend URL, e.g. http://127.0.0.1:8000")
    v.add_argument("--platform", required=True, choices=["android", "ios"])
    v.add_argument("--data-type", default=None, help="data type to ask for (default: dataset)")
    v.add_argument("--dataset", default="digits")
    v.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:K")
    v.add_argument("--num-partitions", type=int, default=1)
    v.add_argument("--partition-id", type=int, default=0)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device-id", type=int, default=1)
    v.add_argument("--encoding", default="raw", choices=["raw", "npy"],
                   help="raw float32 (FedKit) or npy (Flower's iOS SDK)")
    v.add_argument("--slowdown", type=float, default=1.0, help="compute slowdown factor")
    v.add_argument("--join-delay", type=float, default=0.0)
    v.add_argument("--drop-prob", type=float, default=0.0, help="chance to drop mid-fit")
    v.add_argument("--rejoin-delay", type=float, default=1.0)
    v.add_argument("--network-delay", type=float, default=0.0)
    v.add_argument("--max-wait", type=float, default=120.0,
                   help="seconds to wait for a session before giving up")
    v.add_argument("--cache-dir", default=".xfl-cache")
    v.add_argument("--ca-file", default=None, metavar="PEM",
                   help="CA to trust for an https backend (its gRPC ports use TLS too); the "
                        "device token, if any, comes from $XFLWB_DEVICE_TOKEN")
    v.add_argument("--status-file", default=None, help="JSON status, rewritten on change")
    v.add_argument("--run-id", default=None, help="written into the status file (a fleet "
                   "reads only its own run's files)")
    v.set_defaults(func=cmd_device)
    x = sub.add_parser("experiment", help="run experiment notebooks headless (papermill)")
    xsub = x.add_subparsers(dest="action", required=True)
    xr = xsub.add_parser("run", help="execute a notebook, write it and a results CSV")
    xr.add_argument("notebook")
    xr.add_argument("--out", required=True, help="output directory (never overwritten)")
    xr.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"))
    xr.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                    help="sweep: run every combination (repeatable)")
    xr.add_argument("--kernel", default=None, help="Jupyter kernel name")
    xr.set_defaults(func=cmd_experiment)
    m = sub.add_parser("simulate", help="train on Flower's Simulation Engine (Ray)")
    m.add_argument("model", help="an export directory, or a model published in --data-dir")
    m.add_argument("--android", type=int, default=0)
    m.add_argument("--ios", type=int, default=0)
    m.add_argument("--rounds", type=int, default=10)
    m.add_argument("--dataset", default="digits")
    m.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:K")
    m.add_argument("--strategy", default="fedavg")
    m.add_argument("--fraction-fit", type=float, default=1.0)
    m.add_argument("--fraction-evaluate", type=float, default=None)
    m.add_argument("--min-clients", type=int, default=None)
    m.add_argument("--local-epochs", type=int, default=1)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--drop-prob", type=float, default=0.0,
                   help="chance that a sampled client drops out of a fit")
    m.add_argument("--ray-address", default=None, help='"auto" or ray://host:10001')
    m.add_argument("--data-dir", default="xfl-data")
    m.add_argument("--timeout", type=float, default=None, help="seconds (default: none)")
    m.add_argument("--out", default=None, help="write the history CSV here (never overwritten)")
    m.add_argument("--no-progress", action="store_true", help="no round progress bar")
    m.set_defaults(func=cmd_simulate)
    d = sub.add_parser("demo", help="the whole workflow offline: export a CNN, serve it, train "
                       "2 Android + 2 iOS virtual phones for 10 rounds, plot")
    d.add_argument("--out", default="demo-output")
    d.add_argument("--epochs", type=int, default=3, help="with --local-only")
    d.add_argument("--rounds", type=int, default=10)
    d.add_argument("--seed", type=int, default=0)
    # the keys of xflwb.demo.MODELS (not imported here: the parser stays light)
    d.add_argument("--model", default="digits_cnn", choices=["digits_cnn", "activity"],
                   help="digits_cnn: Conv2D on 8×8 digits; activity: Conv1D on (32, 3) "
                   "accelerometer windows (dataset and data type 'activity')")
    d.add_argument("--local-only", action="store_true",
                   help="only export and train the three runtimes side by side")
    d.set_defaults(func=cmd_demo)
    _add_verbose_everywhere(p)
    return p


def _add_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                if not any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    add_verbose(child)
                _add_verbose_everywhere(child)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        from xflwb import _quiet

        _quiet.set_verbose(True)  # before any TensorFlow import; child processes inherit it
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
