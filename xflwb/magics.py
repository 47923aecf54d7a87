"""IPython magics: thin wrappers that parse a line and call the public API.

A failing magic raises an ``XflMagicError`` (never prints and returns ``None``), so "Run
All" stops and papermill / nbval runs fail; IPython shows it as one red line, not a
traceback (``_render_traceback_``). The API error it wraps stays its ``__cause__``.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from xflwb._argparse import Parser, explain
from xflwb._options import add_arguments, given
from xflwb.bridge.params import PLATFORMS
from xflwb.devices.device import DeviceOptions
from xflwb.devices.fleet import FleetOptions
from xflwb.errors import InputError, XflwbError
from xflwb.server.config import BackendOptions, SessionConfig, TLSOptions
from xflwb.simulation.config import SimulationConfig

#: what a magic shows as one line, the API error kept as its ``__cause__``: anything xflwb
#: refused or could not do (the root of its errors), and the operating system refusing a
#: port, a file or a connection (an ``OSError`` names it). Anything else is a bug and keeps
#: its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (XflwbError, OSError)


class XflMagicError(XflwbError):
    """A magic failed; the message says what and how to fix it."""

    def _render_traceback_(self) -> list[str]:
        """What IPython shows instead of a traceback: the message, in red, on one line
        (a message that is itself a list, such as an export's refused layers, keeps its
        own lines)."""
        first, *rest = str(self).splitlines() or [""]
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {first}", *rest]


class MagicUsageError(XflMagicError, InputError):
    """Bad magic arguments: the message says which and what would be valid."""

    def _render_traceback_(self) -> list[str]:
        """Always one line (user tokens are quoted, but never trust a line break)."""
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: "
                + " ".join(str(self).splitlines())]


def _shown(token: str) -> str:
    """A token as typed, or quoted when it holds blanks or control characters."""
    return token if token and token.isprintable() and " " not in token else repr(token)


#: options that no longer exist, and what to use instead
RENAMED = {"--start-fresh": "--start-fresh was replaced by --resume: sessions start fresh "
                            "unless you pass --resume"}


class _Parser(Parser):
    """The CLI's parser (no abbreviations, "did you mean", synonyms such as
    ``--lr`` for ``--learning-rate``) raising a one-line ``MagicUsageError``: never
    SystemExit inside a kernel."""

    error_class = MagicUsageError

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("add_help", False)
        super().__init__(*args, raise_errors=True, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # argparse would join them with blanks; show each one unambiguously
            self.error(f"unrecognized arguments: {' '.join(map(_shown, extras))}")
        return ns

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments: "):
            for token in message.split()[2:]:
                if token.split("=", 1)[0] in RENAMED:
                    message = RENAMED[token.split("=", 1)[0]]
                    break
        text = "; ".join(line.strip() for line in explain(self, message).splitlines())
        raise MagicUsageError(f"{self.prog}: {text} (see {self.prog} --help)")


def _parse(parser: argparse.ArgumentParser, line: str) -> argparse.Namespace | None:
    """Parse a magic line; ``None`` after printing the help for ``-h`` / ``--help``."""
    try:
        args = shlex.split(line)
    except ValueError as exc:  # an unclosed quote
        raise MagicUsageError(f"{parser.prog}: cannot split the options ({exc}): "
                              f"{line!r}") from None
    if "-h" in args or "--help" in args:
        print(parser.format_help())
        return None
    return parser.parse_args(args)


@contextmanager
def _failing_as(prog: str) -> Iterator[None]:
    """Turn the public API's errors into one-line magic errors naming the magic."""
    try:
        yield
    except XflMagicError as exc:
        if str(exc).startswith(f"{prog}:"):
            raise
        raise type(exc)(f"{prog}: {exc}") from exc
    except USER_ERRORS as exc:
        raise XflMagicError(f"{prog}: {exc}") from exc


def _export_parser() -> argparse.ArgumentParser:
    from xflwb._export_options import add_export_options

    p = _Parser(prog="%%xfl_export", add_help=False)
    p.add_argument("name")
    add_export_options(p)
    return p


def _assigns_model(cell: str) -> bool:
    """Does the cell bind the name ``model`` (even to an object that existed before)?"""
    import ast

    from IPython.core.inputtransformer2 import TransformerManager

    try:
        tree = ast.parse(TransformerManager().transform_cell(cell))
    except SyntaxError:
        return False
    return any(isinstance(n, ast.Name) and n.id == "model" and isinstance(n.ctx, ast.Store)
               for n in ast.walk(tree))


def find_model(namespace: dict[str, Any], before: dict[str, int], cell: str = "") -> Any:
    """The variable ``model`` if the cell binds it, else the only Keras model it created."""
    import keras

    if isinstance(namespace.get("model"), keras.Model) and (
            before.get("model") != id(namespace["model"]) or _assigns_model(cell)):
        return namespace["model"]
    new = {k: v for k, v in namespace.items()
           if isinstance(v, keras.Model) and before.get(k) != id(v) and not k.startswith("_")}
    if len(new) == 1:
        return next(iter(new.values()))
    if not new:
        raise MagicUsageError("the cell defined no Keras model: assign one to a variable "
                              "named `model` (e.g. model = keras.Sequential([...]))")
    raise MagicUsageError(f"the cell created several Keras models ({', '.join(sorted(new))}); "
                          "name the one to export `model`")


@magics_class
class XflMagics(Magics):
    """``%%xfl_export NAME [options]``: export the model the cell defines."""

    shell: InteractiveShell  # IPython sets it when it registers the magics

    @cell_magic
    def xfl_export(self, line: str, cell: str) -> Any:
        import xflwb
        from xflwb._export_options import export_kwargs

        args = _parse(_export_parser(), line)
        if args is None:
            return None
        ns = self.shell.user_ns
        before = {k: id(v) for k, v in ns.items()}
        result = self.shell.run_cell(cell, store_history=False, silent=False)
        if not result.success:
            err = result.error_in_exec or result.error_before_exec
            raise XflMagicError(f"%%xfl_export: the cell raised {type(err).__name__}: {err} "
                                "(shown above); nothing was exported")
        with _failing_as("%%xfl_export"):
            model = find_model(ns, before, cell)
            kwargs = export_kwargs(args)
            res = xflwb.export(model, name=args.name, **kwargs)
        ns[args.name] = res
        from IPython.display import HTML, display

        display(HTML(res._repr_html_()))
        return None


def _server_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="%xfl_server", add_help=False)
    p.add_argument("action", choices=["start", "stop", "status", "token"])
    p.add_argument("device", nargs="?", default=None,
                   help="token: the device to issue a token for")
    add_arguments(p, BackendOptions)
    add_arguments(p, TLSOptions)
    p.add_argument("--revoke", action="store_true",
                   help="token: revoke the device's tokens instead")
    p.add_argument("--ttl", type=float, default=None, metavar="SECONDS",
                   help="token: it expires this many seconds from now")
    p.add_argument("--session", type=int, default=None, metavar="ID",
                   help="token: valid for this session only")
    return p


def _train_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="%xfl_train", add_help=False)
    p.add_argument("name", help="an ExportResult variable or a published model name")
    add_arguments(p, SessionConfig)
    return p


def _simulate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="%xfl_simulate", add_help=False,
                description="Train on Flower's Simulation Engine (Ray): Android clients run "
                "the .tflite, iOS clients the Core ML executor. Uses the running backend's "
                "registry if there is one, else --data-dir.")
    p.add_argument("name", help="an ExportResult variable or a published model name")
    add_arguments(p, SimulationConfig)
    add_arguments(p, BackendOptions, only=("data_dir", "db_url"))
    return p


def _devices_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="%xfl_devices", add_help=False,
                description="Device knobs take one value or one per device: --slowdown "
                "1,1,10")
    p.add_argument("action", choices=["spawn", "list", "stop"])
    add_arguments(p, FleetOptions)
    add_arguments(p, DeviceOptions, per_item=True)
    return p


@dataclass
class ShellState:
    """What the magics of one IPython shell remember between cells: the backend
    ``%xfl_server start`` started (or attached to). Its fleets are the workbench's own
    (``wb.fleets``): nothing here keeps a second list of them."""

    workbench: Any = None

    def running(self, prog: str) -> Any:
        """The shell's running Workbench; raises, saying how to start one, if none runs."""
        wb = self.workbench
        if wb is None or not wb.running:
            raise XflMagicError(f"{prog}: no xflwb backend is running; start one with "
                                "%xfl_server start")
        return wb

    @property
    def fleets(self) -> list[Any]:
        """The running backend's fleets, oldest first (none without a backend)."""
        wb = self.workbench
        return list(wb.fleets) if wb is not None else []


def state_of(shell: Any) -> ShellState:
    """The magics' state of ``shell`` (``%load_ext xflwb`` made it)."""
    magics = shell.magics_manager.registry.get(XflServerMagics.__name__)
    if magics is None:
        raise LookupError("xflwb's magics are not loaded in this shell: %load_ext xflwb")
    state: ShellState = magics.state
    return state


@magics_class
class XflServerMagics(Magics):
    """``%xfl_server start|stop|status`` and ``%xfl_train NAME``: the notebook's backend.

    One instance per IPython shell (``register``), holding that shell's ``ShellState``:
    two shells in one process never share a backend through the magics."""

    shell: InteractiveShell  # IPython sets it when it registers the magics

    def __init__(self, shell: Any = None, state: ShellState | None = None) -> None:
        super().__init__(shell)
        self.state = state if state is not None else ShellState()

    def _running(self, prog: str) -> Any:
        return self.state.running(prog)

    @line_magic
    def xfl_devices(self, line: str) -> Any:
        """``%xfl_devices spawn --android N --ios M ... | list | stop``."""
        args = _parse(_devices_parser(), line)
        if args is None:
            return None
        if args.action == "spawn":
            wb = self._running("%xfl_devices")
            with _failing_as("%xfl_devices"):
                fleet = wb.spawn_devices(**given(args, FleetOptions),
                                         **given(args, DeviceOptions))
            self.shell.user_ns["xfl_fleet"] = fleet
            counts = {p: fleet.platforms.count(p) for p in PLATFORMS}
            print(f"spawned {counts['android']} Android + {counts['ios']} iOS devices (as "
                  "`xfl_fleet`)")
            return fleet.table
        if args.action == "list":
            import pandas as pd

            tables = [f.table for f in self.state.fleets]
            return pd.concat(tables, ignore_index=True) if tables else None
        if self.state.workbench is not None:
            self.state.workbench.stop_devices()
        print("devices stopped")
        return None

    @line_magic
    def xfl_server(self, line: str) -> Any:
        import xflwb

        args = _parse(_server_parser(), line)
        if args is None:
            return None
        if args.device is not None and args.action != "token":
            raise MagicUsageError(f"%xfl_server: unrecognized arguments: {_shown(args.device)} "
                                  f"(only 'token' takes a device name)")
        wb = self.state.workbench
        if args.action == "start":
            if wb is not None and wb.running:
                print(f"already running at {wb.url}")
                return wb
            from xflwb.workbench import Workbench, tls_from_options

            options = given(args, BackendOptions)
            running = Workbench.running_for(options.get("data_dir", BackendOptions.data_dir))
            if running is not None:  # one backend per data dir: this kernel's, attached
                self.state.workbench = running
                self.shell.user_ns["xfl_wb"] = running
                print(f"attached to the backend this kernel already runs at {running.url} "
                      f"for {running.data_dir} (as `xfl_wb`)")
                return running
            with _failing_as("%xfl_server"):
                tls = tls_from_options(TLSOptions(**given(args, TLSOptions)),
                                       options.get("host", BackendOptions.host))
                wb = xflwb.Workbench(tls=tls, **options).start()
            self.state.workbench = wb
            self.shell.user_ns["xfl_wb"] = wb
            print(f"xflwb backend at {wb.url} (as `xfl_wb`; admin token in xfl_wb.admin_token)")
            return wb
        if args.action == "stop" and (wb is None or not wb.running):
            print("no xflwb backend is running; nothing to stop")  # stopped is stopped
            return None
        wb = self._running("%xfl_server")
        if args.action == "stop":
            wb.stop()  # and its fleets
            print("xflwb backend stopped")
            return None
        if args.action == "token":
            if not args.device:
                raise MagicUsageError("%xfl_server: token needs a device name, e.g. "
                                      "%xfl_server token pixel-7")
            with _failing_as("%xfl_server"):
                if args.revoke:
                    n = wb.revoke_device_token(args.device)
                    print(f"revoked {n} token(s) of {args.device}")
                    return None
                token = wb.issue_device_token(args.device, ttl=args.ttl,
                                              session=args.session)
            limits = "".join([f", expires in {args.ttl:g} s" if args.ttl else "",
                              f", session {args.session} only" if args.session else ""])
            print(f"token for {args.device} (shown once{limits}; the phone sends it as "
                  f"'Authorization: Bearer <token>'): {token}")
            return token
        from IPython.display import HTML, display

        display(HTML(status_html(wb, self.state.fleets)))
        return wb.session_table

    @line_magic
    def xfl_train(self, line: str) -> Any:
        import xflwb

        args = _parse(_train_parser(), line)
        if args is None:
            return None
        wb = self._running("%xfl_train")
        target = self.shell.user_ns.get(args.name)
        name = args.name
        if isinstance(target, xflwb.ExportResult):
            name = target.name
        else:
            target = args.name
        with _failing_as("%xfl_train"):
            session = wb.train(target, **given(args, SessionConfig))
        var = re.sub(r"\W", "_", name) + "_session"
        self.shell.user_ns[var] = session
        print(f"session {session.id} for {name}: {session.started_from}; ports "
              f"{session.ports} (as `{var}`)")
        from IPython.display import display

        from xflwb.widgets.dashboard import Dashboard

        fleets = self.state.fleets
        fleet = fleets[-1] if fleets else None
        display(Dashboard(session, fleet).start())
        return session


    @line_magic
    def xfl_simulate(self, line: str) -> Any:
        """``%xfl_simulate NAME --android N --ios M --rounds R [...]``: a simulated fleet
        with the same live dashboard as ``%xfl_train``; returns the Session at once."""
        import xflwb
        from xflwb import simulation

        args = _parse(_simulate_parser(), line)
        if args is None:
            return None
        target = self.shell.user_ns.get(args.name)
        source = target if isinstance(target, xflwb.ExportResult) else args.name
        options = given(args, SimulationConfig)
        wb = self.state.workbench
        with _failing_as("%xfl_simulate"):
            if wb is not None and wb.running:
                session = wb.simulate(source, wait=False, **options)
            else:
                session = simulation.simulate(source, wait=False,
                                              **given(args, BackendOptions), **options)
        name = getattr(source, "name", args.name)
        var = re.sub(r"\W", "_", str(name)) + "_simulation"
        self.shell.user_ns[var] = session
        cfg = session.info["config"]
        print(f"simulation {session.id} of {name}: {cfg['android']} Android + {cfg['ios']} "
              f"iOS clients on Ray (as `{var}`)")
        from IPython.display import display

        from xflwb.widgets.dashboard import Dashboard

        display(Dashboard(session).start())
        return session


def mask_token(token: str) -> str:
    """``…a1b2``: enough to tell tokens apart, never enough to use one (a notebook's
    outputs are saved, shared and committed)."""
    return f"…{token[-4:]}" if len(token) >= 16 else "…"


def status_html(wb: Any, fleets: list[Any]) -> str:
    """URL, masked admin token, sessions, devices and a QR code a phone can scan for the URL."""
    import html

    import segno

    qr = segno.make(wb.url, error="m").svg_inline(scale=3)
    devices = sum(len(f.ids) for f in fleets)
    tls = getattr(wb, "tls", None)
    security = (f"TLS on, phones trust <code>{html.escape(str(tls.ca_file))}</code> (SHA-256 "
                f"<code>{html.escape(tls.fingerprint)}</code>)" if tls is not None
                else "TLS off")
    security += (", device tokens required" if getattr(wb, "device_auth", None) == "token"
                 else ", devices not enrolled (open, as FedKit)")
    warnings = "".join(f"<br/><b style='color:#b00'>warning:</b> {html.escape(w)}"
                       for w in getattr(wb, "security_warnings", []))
    disk = html.escape("\n".join(wb.disk_usage().lines()))
    return (f"<div><b>xflwb backend</b> at <code>{html.escape(wb.url)}</code> — admin token "
            f"<code>{html.escape(mask_token(wb.admin_token))}</code> (whole: "
            f"<code>xfl_wb.admin_token</code>), {len(wb.session_table)} session(s), "
            f"{devices} virtual device(s)<br/>{security}{warnings}<br/><b>disk</b>"
            f"<pre style='margin:0'>{disk}</pre>{qr}</div>")


def show_option_error(shell: Any, etype: type, value: BaseException, tb: Any,
                      tb_offset: int | None = None) -> None:
    """IPython's custom exception handler for ``xflwb.OptionError``: a user's typo in
    ``wb.train(min_client=2)`` shows as ``UnknownOptionError: …: did you mean
    'min_clients'?``, not as a traceback through the validation. ``_showtraceback`` is how
    IPython's own ``showtraceback`` publishes (ipykernel: an ``error`` message, so the cell
    still fails and papermill still stops)."""
    shell._showtraceback(etype, value, [f"{etype.__name__}: {value}"])


def register(ipython: Any) -> None:
    """Register the magics on ``ipython``, with a state of its own (a second registration,
    e.g. ``%reload_ext xflwb``, keeps the shell's state: its backend stays attached)."""
    ipython.register_magics(XflMagics)
    old = ipython.magics_manager.registry.get(XflServerMagics.__name__)
    ipython.register_magics(XflServerMagics(ipython, getattr(old, "state", None)))
    from xflwb._options import OptionError

    # IPython keeps one custom handler: never replace a handler the user set
    if not ipython.custom_exceptions or ipython.custom_exceptions == (OptionError,):
        ipython.set_custom_exc((OptionError,), show_option_error)
