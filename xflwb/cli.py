"""The ``xflwb`` command: parses arguments and delegates to the public API."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xflwb._argparse import Parser
from xflwb._export_options import add_export_options, add_verbose, export_kwargs
from xflwb._options import add_arguments, given
from xflwb.devices.entry import add_device_arguments
from xflwb.server.config import BackendOptions, SessionConfig, TLSOptions
from xflwb.simulation.config import SimulationConfig

DESCRIPTION = """\
xflwb: cross-platform federated learning on phones, from a notebook or this command.

Export a Keras model as a trainable TFLite model (Android) and an updatable Core ML model
(iOS) that provably compute the same thing, serve both from a bundled backend with a real
Flower server, and train on real phones, virtual phones, or Flower's Simulation Engine."""

EPILOG = """\
examples:
  xflwb demo                       export, serve, 2 Android + 2 iOS virtual phones, train
  xflwb export mymodels:build_cnn --name cnn --data-type digits --learning-rate 0.05
  xflwb server --port 8000 --publish artifacts/cnn/v1 --auto-start
  xflwb simulate artifacts/cnn/v1 --android 50 --ios 50 --rounds 5 --out runs/sim.csv
  xflwb experiment run experiments/fedavg_digits.ipynb --out runs/a -p rounds 2

'xflwb COMMAND --help' describes a command's options. TensorFlow's log lines are hidden;
--verbose shows them. In a notebook: %load_ext xflwb (see docs/devices.md)."""


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


def _admin_token_note(wb: Any, options: dict[str, Any]) -> str:
    """How the operator gets the admin token, never the token itself (terminal output is
    logged and shared): one the operator gave stays where it came from; a generated one is
    written to ``DATA_DIR/admin_token``, readable by its owner only."""
    token = str(wb.admin_token)
    masked = f"…{token[-4:]}" if len(token) >= 16 else "…"  # as %xfl_server status
    if options.get("admin_token") or os.environ.get("XFLWB_ADMIN_TOKEN"):
        return f"{masked}, as given"
    path = Path(wb.registry.data_dir) / "admin_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(wb.admin_token + "\n")
    os.chmod(path, 0o600)  # an older file keeps its mode through O_TRUNC
    return f"{masked}, whole in {path}; export XFLWB_ADMIN_TOKEN=$(cat {path})"


def cmd_server(args: argparse.Namespace) -> int:
    """Run the backend in the foreground until Ctrl-C / SIGTERM (``status``: report what
    its data dir holds instead)."""
    if args.action == "status":
        return server_status(args)
    import signal
    import threading

    import xflwb
    from xflwb.workbench import tls_from_options

    try:
        options = given(args, BackendOptions)
        tls = tls_from_options(TLSOptions(**given(args, TLSOptions)),
                               options.get("host", BackendOptions.host))
        wb = xflwb.Workbench(tls=tls, **options)
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
    print(f"xflwb backend at {wb.url}  (admin token: {_admin_token_note(wb, options)})",
          flush=True)
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


def cmd_token(args: argparse.Namespace) -> int:
    """Issue, list or revoke device tokens in the registry a backend serves from."""
    from xflwb.server.security import TokenStore
    from xflwb.sessions.registry import NotFound, Registry

    opts = BackendOptions(**given(args, BackendOptions))
    registry = Registry(opts.data_dir, opts.db_url)
    try:
        store = TokenStore(registry)
        if args.action == "issue":
            if not args.device:
                print("xflwb token issue: error: name the device, e.g. xflwb token issue "
                      "pixel-7", file=sys.stderr)
                return 2
            try:
                if args.session is not None:
                    registry.get_session(args.session)
                row = store.issue(args.device, ttl=args.ttl, session=args.session)
            except (ValueError, NotFound) as exc:
                print(f"xflwb token issue: error: {exc}", file=sys.stderr)
                return 2
            limits = "".join([f"; expires {_when(row['expires'])}" if row["expires"] else "",
                              f"; session {row['session']} only" if row["session"] else ""])
            print(f"token for {row['device']} (id {row['id']}{limits}; shown once): "
                  f"{row['token']}")
        elif args.action == "list":
            import time as _time

            now = _time.time()
            for row in store.list():
                state = ("revoked " + _when(row["revoked"]) if row["revoked"] else
                         "expired " + _when(row["expires"])
                         if row["expires"] and row["expires"] <= now else "active")
                if row["expires"] and not row["revoked"] and row["expires"] > now:
                    state += f" until {_when(row['expires'])}"
                scope = f"session {row['session']}" if row["session"] else "all sessions"
                print(f"{row['id']:>5}  {row['device']:<32} {state:<34} {scope}")
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


def _when(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def cmd_device(args: argparse.Namespace) -> int:
    """One virtual phone: the devices' own entry point (``python -m xflwb.devices``)."""
    from xflwb.devices.entry import run

    return run(args, prog="xflwb device")


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


def _refuse_existing(out: Path | None, command: str) -> bool:
    if out is not None and out.exists():
        print(f"xflwb {command}: error: {out} exists; results are never overwritten",
              file=sys.stderr)
        return True
    return False


def _follow(session: Any, rounds: int, args: argparse.Namespace, command: str,
            what: str) -> int:
    """Wait for ``session`` with a round bar, then print its last round per platform and
    write its history CSV (``--out``); 0 if it finished."""
    from xflwb import _console

    out = Path(args.out) if args.out else None
    try:
        status = _console.wait(session, rounds, timeout=args.timeout,
                               progress=not args.no_progress)
    except (TimeoutError, KeyboardInterrupt) as exc:
        session.stop()  # this command started it: it does not outlive the command
        why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        print(f"xflwb {command}: error: {why}; stopped {what} "
              f"{session.id}", file=sys.stderr)
        return 1
    if status != "finished":
        print(f"xflwb {command}: error: {what} {session.id} {status}: "
              f"{session.info.get('error') or 'no reason recorded'}"
              + (f" (log: {session.log_path})" if getattr(session, "log_path", None) else ""),
              file=sys.stderr)
        return 1
    hist = session.history
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        hist.to_csv(out, index=False)
    last = hist[hist["round"] == hist["round"].max()]
    wide = last.pivot_table(index="platform", columns="metric", values="value")
    keep = [c for c in ("clients", "examples", "eval_loss", "accuracy") if c in wide.columns]
    reason: str | None = getattr(session, "end_reason", None)  # "finished all 8 rounds", …
    print(f"{what} {session.id}: {session.status}, round {session.round}"
          + (f" ({reason})" if reason else ""))
    print(_console.format_table(wide[keep], index=True))
    _print_traffic(hist, session.info.get("config"))
    if out is not None:
        print(f"history in {out}")
    return 0


def _print_traffic(history: Any, config: dict[str, Any] | None) -> None:
    """The session's bytes per platform and direction, and (when the history records what
    float32 would have cost) the compression ratio: what ``xflwb.report`` shows."""
    from xflwb import _console
    from xflwb.style import compression_line, compression_summary, traffic_table

    table = traffic_table(history, config)
    if table.empty:
        return
    print("bytes on the wire (totals):")
    print(_console.format_table(table))
    line = compression_line(compression_summary(history, config))
    if line:
        print(f"compression vs float32: {line}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from xflwb.simulation import simulate

    if _refuse_existing(Path(args.out) if args.out else None, "simulate"):
        return 2
    options = given(args, SimulationConfig)
    try:
        session = simulate(args.model, wait=False, **given(args, BackendOptions), **options)
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"xflwb simulate: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, RuntimeError) else 2
    # the rounds as the session stores them (its config validated once, by simulate)
    return _follow(session, int(session.info["config"]["rounds"]), args, "simulate",
                   "simulation")


def cmd_train(args: argparse.Namespace) -> int:
    """Start a session through a running backend's admin API; optionally follow it."""
    import os

    from xflwb.admin import AdminClient

    if args.wait and _refuse_existing(Path(args.out) if args.out else None, "train"):
        return 2
    options = given(args, SessionConfig)
    token = (given(args, BackendOptions).get("admin_token")
             or os.environ.get("XFLWB_ADMIN_TOKEN"))
    try:
        if not token:
            raise ValueError("the admin API needs its token: --admin-token TOKEN or "
                             "$XFLWB_ADMIN_TOKEN (xflwb server prints it at start)")
        client = AdminClient(args.url, token, ca_file=args.ca_file)
        session = client.train(args.model, **options)  # bad options: refused, nothing sent
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"xflwb train: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    print(f"session {session.id} of {session.model}: {session.started_from}; gRPC ports "
          f"{session.ports}", flush=True)
    if not args.wait:
        return 0
    # the rounds as the backend stored them (validated there, and before sending)
    return _follow(session, int(session.config["rounds"]), args, "train", "session")


def cmd_demo(args: argparse.Namespace) -> int:
    from xflwb import demo

    if args.local_only:
        demo.run(out=args.out, epochs=args.epochs, seed=args.seed, model=args.model)
        return 0
    result = demo.run_federated(out=args.out, rounds=args.rounds, seed=args.seed,
                                model=args.model)
    return 0 if result["status"] == "finished" else 1


def _add_follow_options(p: argparse.ArgumentParser, wait_help: str | None) -> None:
    """How a command follows a session it started (``wait_help``: it may also not wait)."""
    if wait_help is not None:
        p.add_argument("--wait", action="store_true", help=wait_help)
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait (default: no limit)")
    p.add_argument("--out", default=None, help="write the history CSV here (never "
                   "overwritten)")
    p.add_argument("--no-progress", action="store_true", help="no round progress bar")


def server_status(args: argparse.Namespace) -> int:
    """``xflwb server status``: the data dir's disk use (checkpoints, artifacts, database,
    logs). Reads the registry directly, so it works whether or not a backend runs."""
    import json

    from xflwb.server.disk import disk_usage
    from xflwb.sessions.registry import Registry

    options = given(args, BackendOptions)
    data_dir = Path(options.get("data_dir", BackendOptions.data_dir))
    if not options.get("db_url") and not (data_dir / "xflwb.db").is_file():
        print(f"xflwb server status: error: {data_dir} holds no xflwb registry (no "
              "xflwb.db); pass the backend's --data-dir (and --db-url if it uses one)",
              file=sys.stderr)
        return 2
    registry = Registry(data_dir, options.get("db_url"))
    try:
        usage = disk_usage(registry)
    finally:
        registry.close()
    print(json.dumps(usage.as_dict()) if args.json else "\n".join(usage.lines()))
    return 0


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
    s = sub.add_parser("server", help="run the backend (HTTP API + sessions) in the foreground; "
                       "'xflwb server status': its data dir's disk use")
    s.add_argument("action", nargs="?", choices=["run", "status"], default="run",
                   help="run (default): serve until Ctrl-C; status: print the disk use of "
                   "--data-dir (checkpoints, artifacts, database, logs) and exit")
    s.add_argument("--json", action="store_true", help="status: print it as JSON")
    add_arguments(s, BackendOptions)
    add_arguments(s, TLSOptions)
    s.add_argument("--publish", action="append", metavar="EXPORT_DIR",
                   help="publish an export directory at start (repeatable)")
    s.set_defaults(func=cmd_server)
    t = sub.add_parser("token", help="issue, list or revoke device tokens (--device-auth "
                                     "token)")
    t.add_argument("action", choices=["issue", "list", "revoke"])
    t.add_argument("device", nargs="?", default=None,
                   help="device name (issue, revoke) or token id (revoke)")
    t.add_argument("--ttl", type=float, default=None, metavar="SECONDS",
                   help="issue: the token expires this many seconds from now")
    t.add_argument("--session", type=int, default=None, metavar="ID",
                   help="issue: the token is valid for this session only")
    add_arguments(t, BackendOptions, only=("data_dir", "db_url"))
    t.set_defaults(func=cmd_token)
    tr = sub.add_parser("train", help="start a session on a running backend (its admin API) "
                        "and follow it")
    tr.add_argument("model", help="a published model name, or an export directory on the "
                    "backend's machine (published first)")
    add_arguments(tr, SessionConfig)
    tr.add_argument("--url", default="http://127.0.0.1:8000",
                    help="the backend (default: http://127.0.0.1:8000)")
    add_arguments(tr, BackendOptions, only=("admin_token",))
    tr.add_argument("--ca-file", default=None, metavar="PEM",
                    help="CA to trust for an https backend")
    _add_follow_options(tr, "wait for the session to end (default: print its id and return)")
    tr.set_defaults(func=cmd_train)
    v = sub.add_parser("device", help="run one virtual phone (FedKit client flow)")
    add_device_arguments(v)
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
    add_arguments(m, SimulationConfig)
    add_arguments(m, BackendOptions, only=("data_dir", "db_url"))
    _add_follow_options(m, None)
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
