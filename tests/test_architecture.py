"""Dependencies point one way (issue 13): front-ends → public API → engines → base.

The test parses every module of ``xflwb`` with ``ast`` (imports inside functions count: a
lazy import is still a dependency) and fails on an arrow against the direction, naming the
file, the line and the arrow. Layers, low to high:

0. **base**: ``xflwb.bridge`` (export, runtimes, manifest), ``xflwb.flower_legacy`` (the one
   adapter over Flower's legacy transport, used by phones, server and simulation alike),
   ``xflwb.style`` and the private helpers ``xflwb._*``.
1. **federation core**: ``xflwb.federation``: what a round means, without transport.
2. **session hosting**: ``xflwb.sessions``: what phone sessions and simulations share (the
   registry, the session process's skeleton, session status/handle/manager, round options,
   checkpoints, lineage, tracking). Only its registry (with its schema and migrations)
   runs SQL.
3. **engines**: ``xflwb.server``, ``xflwb.devices``, ``xflwb.simulation``. Siblings: the
   simulation may use the devices' datasets and partitions; it never imports the server
   (what both need lives in ``xflwb.sessions``); the server imports neither devices nor the
   simulation (it runs whatever engine asks it to: ``SessionManager.start_engine``), and a
   device never imports the server (it only speaks the wire protocol, through
   ``xflwb.flower_legacy``).
4. **public API**: ``xflwb.workbench``, ``xflwb.experiment``, ``xflwb.admin`` (a backend's
   admin API from another process), ``xflwb.exporting`` (``xflwb.export``: the bridge's
   export plus the data-type check against the devices' datasets).
5. **front-ends**: ``xflwb.widgets``, ``xflwb.magics``, ``xflwb.cli``, ``xflwb.demo``,
   ``xflwb.__main__``, and the package facade ``xflwb`` itself: it re-exports the
   dashboard and registers the magics, so it sits on top and nothing below may import it.
   Front-ends do not import one another (shared helpers live below them, e.g.
   ``xflwb._export_options``); they may show a widget and use the facade.

A module is a "room" (``xflwb.server``, ``xflwb.cli``, ``xflwb._argparse``, ...); imports
inside a room are free. An arrow between two rooms of one layer must be listed in
``SIBLINGS`` with its reason. A dotted module name in a string (``python -m
xflwb.simulation.server``) is an arrow too: launching a module by name depends on it.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xflwb"

#: layer of each room (the first component below ``xflwb``; "" is the facade)
LAYERS: dict[str, int] = {
    "bridge": 0, "flower_legacy": 0, "style": 0, "errors": 0,  # and every private ``_*`` room
    "federation": 1,
    "sessions": 2,
    "server": 3, "devices": 3, "simulation": 3,
    "workbench": 4, "experiment": 4, "admin": 4, "exporting": 4,
    "widgets": 5, "magics": 5, "cli": 5, "demo": 5, "__main__": 5, "": 5,
}
LAYER_NAMES = ("base", "federation core", "session hosting", "engines", "public API",
               "front-ends")

#: arrows allowed between rooms of the same layer, with the reason
SIBLINGS: dict[tuple[str, str], str] = {
    ("bridge", "_quiet"): "the converters' log noise is silenced where they are imported",
    ("_export_options", "bridge"): "the export options build the bridge's optimizers",
    ("bridge", "style"): "the export report's tables look like the dashboard's",
    ("bridge", "_imports"): "the Android runtime loads TFLite without TensorFlow's Python API",
    ("flower_legacy", "_imports"): "a Ray worker loads Flower's actor without its server side",
    ("_options", "_argparse"): "an unknown keyword gets the parsers' \"did you mean\"",
    ("bridge", "errors"): "the export errors derive from xflwb.XflwbError (one error tree)",
    ("_options", "errors"): "OptionError is an InputError (one error tree)",
    ("_argparse", "errors"): "CommandLineError is an InputError (one error tree)",
    ("_export_options", "errors"): "a bad export option is an InputError (one error tree)",
    ("simulation", "devices"): "simulated clients train on the devices' datasets/partitions",
    ("__main__", "cli"): "``python -m xflwb`` is the command line",
    ("cli", ""): "the command line calls the public API (xflwb.export, ...)",
    ("cli", "demo"): "``xflwb demo`` runs the demo",
    ("demo", ""): "the demo is a script over the public API",
    ("magics", ""): "the magics call the public API (xflwb.export, ...)",
    ("magics", "widgets"): "``%xfl_train`` shows the dashboard",
    ("", "widgets"): "the facade re-exports Dashboard and report",
    ("", "magics"): "``%load_ext xflwb`` registers the magics through the facade",
}

#: finer arrows that break the direction even where the rooms may meet: (importer prefix,
#: imported prefix) → why not, and where it belongs
FORBIDDEN: dict[tuple[str, str], str] = {
    ("xflwb.simulation", "xflwb.server"):
        "phone sessions and simulations share only what lives in xflwb.sessions (registry, "
        "session process skeleton, status, handle, manager, round options); move a shared "
        "piece there",
    ("xflwb.widgets", "xflwb.server"): "widgets render what the public API (workbench) gives",
    ("xflwb", "sqlalchemy"): "only the registry runs SQL (xflwb.sessions.registry, its "
                             "schema and migrations): ask it through a Registry method",
}
#: the modules a FORBIDDEN arrow does not bind: (importer prefix, imported prefix) → owners
FORBIDDEN_EXCEPT: dict[tuple[str, str], tuple[str, ...]] = {
    ("xflwb", "sqlalchemy"): ("xflwb.sessions.registry", "xflwb.sessions.schema",
                              "xflwb.sessions.migrations"),
}

#: what the federation core may take from ``xflwb.flower_legacy``: Flower's strategy classes
#: (their constructors check options; a server optimiser's update rule is their
#: ``aggregate_fit``, called through ``server_update`` so that no ``FitRes`` is built in the
#: core) and its aggregate functions. Never the transport (client proxies and managers, the
#: legacy ``Server``, gRPC, messages).
FEDERATION_FLOWER_NAMES = frozenset({
    "SERVER_STRATEGIES", "ROBUST_RULES", "server_update", "ndarrays_to_parameters",
    "parameters_to_ndarrays", "aggregate_median", "aggregate_trimmed_avg", "aggregate_krum",
    "flower_aggregate", "dp_api"})
#: Known arrows against the direction, not fixed yet. Each must still exist (a stale entry
#: fails, so the list only shrinks). Empty: keep it so.
ALLOWED_DEBT: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    room = _room(module)
    if room.startswith("_") and room != "__main__":
        return 0
    return LAYERS[room]


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """Absolute targets of ``from ... import ...``: ``from xflwb import cli`` is xflwb.cli."""
    if node.level:
        base = module.split(".")
        if path.name != "__init__.py":
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        pkg = ".".join(base + ([node.module] if node.module else []))
    else:
        pkg = node.module or ""
    return [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in MODULES else pkg for a in node.names]


@functools.cache
def _tree(path: Path) -> ast.Module:
    """``path`` parsed, once per run: every check reads each module (several tests run
    every check), and parsing the package takes seconds. A probe gets a path of its own."""
    return ast.parse(path.read_text(), str(path))


def _arrows(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import and every dotted module name in a string."""
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [(node.lineno, t) for t in _resolve(module, path, node)]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and "." in node.value and node.value in MODULES):
            out.append((node.lineno, node.value))
    return out


def _private_names(module: str, path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) for each private name (``_x``, not a module) imported from
    another room: what a room keeps private may change under its callers."""
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xflwb"):
            for a, target in zip(node.names, _resolve(module, path, node), strict=True):
                if (a.name.startswith("_") and not a.name.startswith("__")
                        and target not in MODULES.keys() - {node.module}
                        and _room(target) != _room(module)):
                    out.append((node.lineno, target, a.name))
    return out


def _module_aliases(module: str, path: Path, tree: ast.AST) -> dict[str, str]:
    """Local names bound to xflwb modules: ``import xflwb.a.b`` binds ``xflwb``, ``import
    xflwb.a.b as m`` binds ``m``, ``from xflwb.a import b`` (``b`` a module) binds ``b``."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "xflwb":
                    out[a.asname or "xflwb"] = a.name if a.asname else "xflwb"
        elif isinstance(node, ast.ImportFrom):
            for a, target in zip(node.names, _resolve(module, path, node), strict=True):
                if target in MODULES and target.endswith("." + a.name):
                    out[a.asname or a.name] = target
    return out


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` of a chain of attributes over a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _private_attributes(module: str, path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) for each ``alias._x`` read of another room's module (``alias``
    bound by an import): the attribute spelling of ``from x import _y``."""
    tree = _tree(path)
    aliases = _module_aliases(module, path, tree)
    out = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            continue
        chain = _dotted(node.value)
        if chain is None or chain.split(".")[0] not in aliases:
            continue
        head, _, rest = chain.partition(".")
        target = aliases[head] + (f".{rest}" if rest else "")
        if (target in MODULES and f"{target}.{node.attr}" not in MODULES  # a submodule
                and _room(target) != _room(module)):
            out.append((node.lineno, target, node.attr))
    return out


def _owner(target: str) -> str | None:
    """The xflwb module ``target`` names (an attribute import names its module)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _violations() -> tuple[list[str], set[tuple[str, str]]]:
    errors, debt_used = [], set()
    for module, path in MODULES.items():
        where = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE) else path
        for line, raw in _arrows(module, path):
            for (src, dst), why in FORBIDDEN.items():
                hit = (module == src or module.startswith(src + ".")) and (
                    raw == dst or raw.startswith(dst + ".")) and module not in \
                    FORBIDDEN_EXCEPT.get((src, dst), ())
                if not hit:
                    continue
                key = (module, _owner(raw) or raw)
                if key in ALLOWED_DEBT:
                    debt_used.add(key)
                else:
                    errors.append(f"{where}:{line}: {module} -> {raw}: {why}")
            target = _owner(raw) if raw.split(".")[0] == "xflwb" else None
            if target is None or _room(target) == _room(module):
                continue
            key = (module, target)
            low, high = _layer(module), _layer(target)
            if low < high:
                msg = (f"{where}:{line}: {module} -> {target} points up, from "
                       f"{LAYER_NAMES[low]} to {LAYER_NAMES[high]}")
            elif low == high and (_room(module), _room(target)) not in SIBLINGS:
                msg = (f"{where}:{line}: {module} -> {target}: rooms of one layer "
                       f"({LAYER_NAMES[low]}) that may not meet; move the shared piece "
                       "below both, or list the arrow in SIBLINGS with its reason")
            else:
                continue
            if key in ALLOWED_DEBT:
                debt_used.add(key)
            else:
                errors.append(msg)
        for line, target, name in _private_names(module, path):
            errors.append(f"{where}:{line}: {module} -> {target}.{name}: a private name of "
                          "another room; make it public there (or move it below both)")
        for line, target, name in _private_attributes(module, path):
            errors.append(f"{where}:{line}: {module} reads {target}.{name}: a private "
                          "attribute of another room; make it public there (or move it "
                          "below both)")
    return errors, debt_used


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for m in MODULES:
        try:
            _layer(m)
        except KeyError:
            unplaced.append(m)
    assert not unplaced, f"put these modules' rooms in LAYERS: {unplaced}"


def test_dependencies_point_one_way() -> None:
    errors, _ = _violations()
    assert not errors, "arrows against the direction:\n" + "\n".join(errors)


def test_allowed_debt_is_still_owed() -> None:
    """A fixed arrow must leave the allow-list, so the debt that is left stays visible."""
    _, used = _violations()
    stale = sorted(set(ALLOWED_DEBT) - used)
    assert not stale, f"these arrows are gone: remove them from ALLOWED_DEBT: {stale}"


def test_allowed_debt_says_why_and_when() -> None:
    assert all(re.search(r"issue \d+: to remove", why) for why in ALLOWED_DEBT.values())


@pytest.mark.parametrize("source, expected", [
    ("from xflwb.widgets.report import x\n", "points up, from base to front-ends"),
    ("def f():\n    import xflwb.cli\n", "points up, from base to front-ends"),
    ("from xflwb.server import grpc_server\n", "points up, from base to engines"),
    ("X = 'xflwb.simulation.server'\n", "points up, from base to engines"),
    ("import sqlalchemy\n", "only the registry runs SQL"),
    ("from xflwb._quiet import _private\n", "a private name of another room"),
    ("from xflwb import _quiet\nx = _quiet._private\n", "a private attribute of another room"),
    ("import xflwb._quiet as q\nx = q._private\n", "a private attribute of another room"),
    ("import xflwb._quiet\nx = xflwb._quiet._private\n", "a private attribute of another room"),
])
def test_an_upward_arrow_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   source: str, expected: str) -> None:
    """The checker itself can fail: a bridge module importing upwards is reported."""
    probe = tmp_path / "xflwb" / "bridge" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source)
    monkeypatch.setitem(MODULES, "xflwb.bridge.probe", probe)
    errors, _ = _violations()
    mine = [e for e in errors if "xflwb.bridge.probe" in e]
    assert len(mine) == 1 and expected in mine[0] and ":" in mine[0], errors


def _federation_imports() -> list[tuple[str, int, str, list[str]]]:
    """(module, line, imported module, names) for every import in ``xflwb.federation``."""
    out = []
    for module, path in MODULES.items():
        if _room(module) != "federation":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                out += [(module, node.lineno, a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                out.append((module, node.lineno, node.module or "",
                            [a.name for a in node.names]))
    return out


def test_the_federation_core_imports_no_host_and_no_transport() -> None:
    """``xflwb.federation`` is what a round means, transport-free (issue 22): it imports
    neither the hosts (server, simulation, sessions) nor gRPC nor Flower's transport.
    Flower's update rules and aggregate functions are reached through
    ``xflwb.flower_legacy`` only (never ``flwr`` directly), by the names in
    ``FEDERATION_FLOWER_NAMES`` (an import of the whole module would let anything
    through)."""
    hosts = ("xflwb.server", "xflwb.simulation", "xflwb.sessions")
    errors = []
    for module, line, target, names in _federation_imports():
        where = f"{module}:{line}: {target}"
        if any(target == h or target.startswith(h + ".") for h in hosts):
            errors.append(f"{where}: a host; the core is hosted, it does not host")
        elif target.split(".")[0] in ("grpc", "ray"):
            errors.append(f"{where}: a transport")
        elif target.split(".")[0] == "flwr":
            errors.append(f"{where}: Flower directly; go through xflwb.flower_legacy")
        elif target == "xflwb.flower_legacy" and not names:
            errors.append(f"{where}: the whole adapter; import the names it needs")
        elif target == "xflwb.flower_legacy" and set(names) - FEDERATION_FLOWER_NAMES:
            errors.append(f"{where}: {sorted(set(names) - FEDERATION_FLOWER_NAMES)} are "
                          "Flower's transport, not its strategy rules")
    assert not errors, "\n".join(errors)
    assert any(t == "xflwb.flower_legacy" for _, _, t, _ in _federation_imports()), \
        "the check sees the core's imports of xflwb.flower_legacy"


@pytest.mark.parametrize("source", [
    "from xflwb.flower_legacy import ClientProxy\n",
    "import xflwb.flower_legacy\n",
    "def f():\n    from flwr.server.client_manager import ClientManager\n",
    "import grpc\n",
    "from xflwb.sessions.flower_strategy import CrossPlatformStrategy\n",
])
def test_a_transport_import_in_the_core_is_caught(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  source: str) -> None:
    probe = tmp_path / "xflwb" / "federation" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(source)
    monkeypatch.setitem(MODULES, "xflwb.federation.probe", probe)
    with pytest.raises(AssertionError, match=r"xflwb\.federation\.probe:"):
        test_the_federation_core_imports_no_host_and_no_transport()
