"""The public surface (issue 22 item 6): ``xflwb.__all__`` is the API, and what we ship uses
nothing else.

Every shipped notebook (``notebooks/``, ``experiments/``), example script (``examples/``) and
Python snippet of ``README.md`` and ``docs/*.md`` is read, not run: each ``import xflwb…``,
``from xflwb… import …`` and ``xflwb.<name>`` must name the package itself or a name in
``xflwb.__all__``. A failure names the file, the cell or line, the name and its public
spelling (or says that none exists yet, and where to add one). Every public name exists and
says why it is there; public classes name ``xflwb`` as their module, and still pickle.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pickle
import re
import typing
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import cloudpickle
import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

import xflwb
from tests.conftest import run_python
from xflwb import _options

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = set(xflwb.__all__)
#: cell magics whose body is Python (``%%xfl_export`` runs the cell, then exports its model)
PYTHON_CELL_MAGICS = {"xfl_export", "time", "capture"}
#: fenced-block languages that are Python; a block without one is tried and skipped if it
#: does not parse (directory trees, diagrams)
PYTHON_FENCES = {"python", "py", "ipython", "python3"}
#: the name of a use that is a whole snippet (one that does not parse)
SNIPPET = "(snippet)"


@dataclasses.dataclass(frozen=True)
class Use:
    """One use of ``xflwb`` outside its public surface."""

    file: str
    where: str  # "cell 2, line 3" / "line 140"
    name: str  # the dotted name used: "xflwb.demo.demo_model"
    fix: str

    def __str__(self) -> str:
        what = "the snippet" if self.name == SNIPPET else f"{self.name} is not public;"
        return f"{self.file}, {self.where}: {what} {self.fix}"


# -- where the shipped code is ---------------------------------------------------------------
def shipped() -> dict[str, list[Path]]:
    """The shipped code the public surface must cover, by kind."""
    return {
        "notebook": sorted([*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("experiments/*.ipynb")]),
        "markdown": sorted([ROOT / "README.md", *ROOT.glob("docs/*.md")]),
        "script": sorted(ROOT.glob("examples/**/*.py")),
    }


def _snippets(path: Path, kind: str) -> Iterator[tuple[str, int, str, bool]]:
    """(where, first line, IPython source, must parse) of each piece of code in ``path``."""
    if kind == "script":
        yield "", 1, path.read_text(), True
    elif kind == "notebook":
        nb = nbformat.read(path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            src = cell.source
            if src.startswith("%%"):
                magic = src[2:].split(None, 1)[0] if src[2:].strip() else ""
                if magic not in PYTHON_CELL_MAGICS:
                    continue  # %%bash and the like: not Python
                src = src.partition("\n")[2]
                yield f"cell {i}", 2, src, True
            else:
                yield f"cell {i}", 1, src, True
    else:
        text = path.read_text()
        for m in re.finditer(r"^```([\w+-]*)[^\n]*\n(.*?)^```", text, re.M | re.S):
            lang, body = m.group(1).lower(), m.group(2)
            if lang in PYTHON_FENCES or (not lang and "xflwb" in body):
                first = text.count("\n", 0, m.start(2)) + 1
                yield "", first, body, lang != ""


# -- the public spelling of an internal name -------------------------------------------------
def _resolve(dotted: str) -> Any:
    """The object ``dotted`` names (a module or an attribute of one); None if it names none."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def public_spelling(dotted: str) -> str:
    """What to write instead of ``dotted``: the public name of the same object, or of the
    same leaf name, or the public functions its module offers; else where to add one."""
    obj = _resolve(dotted)
    leaf = dotted.rsplit(".", 1)[-1]
    same = [n for n in xflwb.__all__ if obj is not None and getattr(xflwb, n) is obj]
    if not same and leaf in PUBLIC:
        same = [leaf]
    if same:
        return f"use xflwb.{same[0]}"
    offered = sorted(n for n in xflwb.__all__
                     if getattr(getattr(xflwb, n), "__module__", None) == dotted)
    if offered:
        return "use " + " / ".join(f"xflwb.{n}" for n in offered) + f" (from {dotted})"
    return ("no public name covers it: use the names in xflwb.__all__, or expose one in "
            "xflwb/__init__.py (with a docstring; docs/contracts.md §8)")


# -- the check -------------------------------------------------------------------------------
class _Reader(ast.NodeVisitor):
    """Collects the non-public ``xflwb`` names a piece of code uses."""

    def __init__(self, aliases: set[str]) -> None:
        self.aliases = aliases  # local names bound to the package: xflwb, `import xflwb as x`
        self.found: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.startswith("xflwb."):
                self.found.append((node.lineno, a.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level or not (module == "xflwb" or module.startswith("xflwb.")):
            return
        for a in node.names:
            if module != "xflwb" or (a.name != "*" and a.name not in PUBLIC):
                self.found.append((node.lineno, f"{module}.{a.name}"))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts, root = [], node
        while isinstance(root, ast.Attribute):
            parts.append(root.attr)
            root = root.value
        if isinstance(root, ast.Name) and root.id in self.aliases:
            parts.reverse()
            if parts[0] not in PUBLIC:
                self.found.append((node.lineno, "xflwb." + ".".join(parts)))
            return  # the whole chain is read: its parts are not uses of their own
        self.generic_visit(node)


def _aliases(trees: list[ast.AST]) -> set[str]:
    """``xflwb`` and the names ``import xflwb as x`` binds anywhere in one file (a notebook's
    cells share one namespace)."""
    names = {"xflwb"}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.asname for a in node.names if a.name == "xflwb" and a.asname}
    return names


def check(path: Path, kind: str) -> list[Use]:
    """The non-public uses of ``xflwb`` in one shipped file (a snippet that must be Python and
    is not is reported too)."""
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    parsed: list[tuple[str, int, ast.AST]] = []
    uses: list[Use] = []
    for where, first, source, strict in _snippets(path, kind):
        try:  # magics become calls, as IPython runs them (same line numbers)
            parsed.append((where, first, ast.parse(TransformerManager().transform_cell(source))))
        except SyntaxError as exc:  # IndentationError too
            if strict:
                line = first + (exc.lineno or 1) - 1
                at = f"{where}, line {line}" if where else f"line {line}"
                uses.append(Use(rel, at, SNIPPET, f"does not parse as Python: {exc.msg}"))
    aliases = _aliases([tree for _, _, tree in parsed])
    for where, first, tree in parsed:
        reader = _Reader(aliases)
        reader.visit(tree)
        for lineno, name in reader.found:
            line = first + lineno - 1
            at = f"{where}, line {line}" if where else f"line {line}"
            uses.append(Use(rel, at, name, public_spelling(name)))
    return uses


def test_shipped_notebooks_docs_and_examples_use_only_the_public_api() -> None:
    files = shipped()
    # the check covers what we ship: five notebooks, two experiments, the README and docs
    assert len(files["notebook"]) >= 7, files["notebook"]
    assert ROOT / "README.md" in files["markdown"] and len(files["markdown"]) > 5
    uses = [u for kind, paths in files.items() for p in paths for u in check(p, kind)]
    assert not uses, "shipped code reaches past xflwb.__all__:\n" + "\n".join(map(str, uses))


def test_the_check_names_file_cell_name_and_fix(tmp_path: Path) -> None:
    """The check fails on the uses the issue found, with the file, the cell and the fix."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# a notebook"),
        nbformat.v4.new_code_cell("%load_ext xflwb\nimport xflwb\n"
                                  "from xflwb.demo import demo_model\n"
                                  "from xflwb import export, Workbench\n"),
        nbformat.v4.new_code_cell("%%xfl_export cnn --data-type digits\n"
                                  "from xflwb.devices.partition import partition_table\n"),
        nbformat.v4.new_code_cell('ca = xflwb.server.security.make_dev_ca("tls")\n'
                                  "xflwb.report(session)\n"),
        nbformat.v4.new_code_cell("import xflwb as x\nfrom xflwb.bridge import runtime\n"
                                  "x.style.color('ios')\n"),
    ]
    nb_path = tmp_path / "nb.ipynb"
    nbformat.write(nb, nb_path)
    uses = {(u.where, u.name): u.fix for u in check(nb_path, "notebook")}
    assert sorted(uses) == [
        ("cell 1, line 3", "xflwb.demo.demo_model"),
        ("cell 2, line 2", "xflwb.devices.partition.partition_table"),
        ("cell 3, line 1", "xflwb.server.security.make_dev_ca"),
        ("cell 4, line 2", "xflwb.bridge.runtime"),
        ("cell 4, line 3", "xflwb.style.color"),
    ]
    assert uses[("cell 1, line 3", "xflwb.demo.demo_model")] == "use xflwb.demo_model"
    assert uses[("cell 2, line 2", "xflwb.devices.partition.partition_table")] == (
        "use xflwb.partition_table")
    assert uses[("cell 3, line 1", "xflwb.server.security.make_dev_ca")] == (
        "use xflwb.make_dev_ca")
    assert uses[("cell 4, line 2", "xflwb.bridge.runtime")] == (
        "use xflwb.load_runtime (from xflwb.bridge.runtime)")
    assert "no public name covers it" in uses[("cell 4, line 3", "xflwb.style.color")]
    assert all(str(nb_path) in str(u) for u in check(nb_path, "notebook"))

    md = tmp_path / "page.md"
    md.write_text("# page\n\n```python\nfrom xflwb.devices import datasets\n"
                  "data = datasets.load('digits')\n```\n\n```\nxflwb/\n├── tree\n```\n"
                  "```python\nthis is (not python\n```\n")
    found = [(u.where, u.name, u.fix) for u in check(md, "markdown")]
    assert found[0][0] == "line 13" and "does not parse" in found[0][2]
    assert found[1:] == [("line 4", "xflwb.devices.datasets",
                          "use xflwb.load_dataset (from xflwb.devices.datasets)")]


# -- the public names themselves -------------------------------------------------------------
def _own_doc(obj: Any) -> str:
    """``obj``'s own docstring: not inherited, not the signature ``dataclass`` writes."""
    doc = vars(obj).get("__doc__") if isinstance(obj, type) else obj.__doc__
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc and doc.startswith(
            obj.__name__ + "("):
        return ""  # dataclass's stand-in: "DP(noise_multiplier: float, ...)"
    return (doc or "").strip()


def test_every_public_name_exists_says_why_and_lives_in_xflwb() -> None:
    assert len(xflwb.__all__) == len(PUBLIC), "a name listed twice in xflwb.__all__"
    missing = [n for n in xflwb.__all__ if not hasattr(xflwb, n)]
    assert not missing, f"xflwb.__all__ lists names xflwb does not define: {missing}"
    undocumented = [n for n in xflwb.__all__ if (isinstance(getattr(xflwb, n), type)
                                                 or callable(getattr(xflwb, n)))
                    and not _own_doc(getattr(xflwb, n))]
    assert not undocumented, f"public names without a docstring: {undocumented}"
    elsewhere = {n: getattr(xflwb, n).__module__ for n in xflwb.__all__
                 if isinstance(getattr(xflwb, n), type)
                 and getattr(xflwb, n).__module__ != "xflwb"}
    assert not elsewhere, f"public classes whose __module__ is not 'xflwb': {elsewhere}"
    assert repr(xflwb.DP) == "<class 'xflwb.DP'>"


#: one instance of each option set and result a process boundary carries
def _instances() -> list[Any]:
    return [xflwb.DP(noise_multiplier=1.0, clipping_norm=0.5), xflwb.SecAgg(num_shares=4),
            xflwb.FedBuff(buffer_size=3), xflwb.SGD(0.05, momentum=0.9), xflwb.Adam(),
            xflwb.DeviceOptions(slowdown=2.0), xflwb.SessionConfig(rounds=3),
            xflwb.SimulationConfig(android=2, ios=1), xflwb.ExportError("no such layer"),
            xflwb.Compression(up="int8", down="fp16"),
            xflwb.DeviceProfiles(availability="diurnal")]


def test_public_classes_pickle_by_their_public_name() -> None:
    classes = [getattr(xflwb, n) for n in xflwb.__all__ if isinstance(getattr(xflwb, n), type)]
    for cls in classes:  # by reference: xflwb.<Name> resolves to the very class
        assert pickle.loads(pickle.dumps(cls)) is cls, cls
    for obj in _instances():
        for dumps in (pickle.dumps, cloudpickle.dumps):  # multiprocessing; Ray
            payload = dumps(obj)
            assert b"xflwb" in payload and type(obj).__name__.encode() in payload
            back = pickle.loads(payload)
            assert type(back) is type(obj)
            if not isinstance(obj, BaseException):
                assert back == obj


def test_public_pickles_load_in_a_fresh_process(tmp_path: Path) -> None:
    """What a Ray worker or a spawned process does: a fresh interpreter, ``xflwb`` imported
    by the unpickling only."""
    path = tmp_path / "options.pkl"
    path.write_bytes(cloudpickle.dumps(_instances()))
    code = ("import pickle, sys\n"
            f"objs = pickle.loads(open({str(path)!r}, 'rb').read())\n"
            "print([type(o).__module__ + '.' + type(o).__name__ for o in objs])\n"
            "print(objs[6].rounds, objs[7].android, objs[0].noise_multiplier)\n")
    out = run_python(code).stdout.splitlines()
    assert out[0] == repr([f"xflwb.{type(o).__name__}" for o in _instances()])
    assert out[1] == "3 2 1.0"


@dataclasses.dataclass
class _Probe:
    """A class whose annotation names something the ``xflwb`` namespace lacks."""

    where: PurePosixPath | None = None


def test_annotations_resolve_where_they_were_written() -> None:
    """Option tools read annotations (``typing.get_type_hints``); with ``__module__`` set to
    "xflwb", typing would look them up in ``xflwb/__init__.py``. ``_options.type_hints``
    looks where the class was written."""
    _Probe.__module__ = "xflwb"
    with pytest.raises(NameError, match="PurePosixPath"):
        typing.get_type_hints(_Probe)
    assert _options.type_hints(_Probe) == {"where": PurePosixPath | None}
    for name in xflwb.__all__:
        cls = getattr(xflwb, name)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            hints = _options.type_hints(cls)
            assert {f.name for f in dataclasses.fields(cls)} <= set(hints), name
    assert "rounds: int = 10" in str(inspect.signature(xflwb.Workbench.train))


def test_the_facade_functions_are_the_tested_implementations(tmp_path: Path) -> None:
    """The names notebooks needed are the implementations their modules' tests cover,
    reachable from ``xflwb``, and they work from there."""
    from xflwb import demo, style
    from xflwb.bridge import runtime
    from xflwb.devices import datasets, partition
    from xflwb.server import security

    assert xflwb.load_runtime is runtime.load and xflwb.load_dataset is datasets.load
    assert xflwb.partition_table is partition.partition_table
    assert xflwb.make_dev_ca is security.make_dev_ca and xflwb.demo_model is demo.demo_model
    assert xflwb.PLATFORM_COLORS is style.PLATFORM_COLORS
    table = xflwb.partition_table("digits", "iid", 3, seed=0)
    data = xflwb.load_dataset("digits", seed=0)
    assert list(table.partition_id) == [0, 1, 2]
    assert table[["train", "test"]].to_numpy().sum() == len(data.y_train) + len(data.y_test)
    ca = xflwb.make_dev_ca(tmp_path / "tls", hosts=["127.0.0.1"])
    assert (tmp_path / "tls" / "ca.pem").is_file() and ca is not None
