"""IPython magics: thin wrappers that parse a line and call the public API."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from IPython.core.magic import Magics, cell_magic, magics_class


class MagicUsageError(ValueError):
    """Bad magic arguments: the message is the usage."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # never SystemExit inside a kernel
        raise MagicUsageError(f"{self.format_usage().strip()}\n{self.prog}: {message}")


def _export_parser() -> argparse.ArgumentParser:
    from xflwb.cli import add_export_options

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

    @cell_magic
    def xfl_export(self, line: str, cell: str) -> Any:
        import xflwb
        from xflwb.cli import export_kwargs

        try:
            args = _export_parser().parse_args(shlex.split(line))
        except MagicUsageError as exc:
            print(exc)
            return None
        ns = self.shell.user_ns
        before = {k: id(v) for k, v in ns.items()}
        result = self.shell.run_cell(cell, store_history=False, silent=False)
        if not result.success:
            return None
        try:
            model = find_model(ns, before, cell)
            kwargs = export_kwargs(args)
            res = xflwb.export(model, name=args.name, **kwargs)
        except (MagicUsageError, xflwb.ExportError, xflwb.ParityError, ValueError,
                TypeError) as exc:
            print(f"xfl_export: {exc}")
            return None
        ns[args.name] = res
        from IPython.display import HTML, display

        display(HTML(res._repr_html_()))
        return None


def register(ipython: Any) -> None:
    ipython.register_magics(XflMagics)
