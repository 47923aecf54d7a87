"""argparse with manners, shared by the ``xflwb`` command and the IPython magics.

* ``allow_abbrev=False``: ``--data-typ`` is an error, not silently ``--data-type`` (a
  prefix that happens to match today stops matching when an option is added tomorrow);
* unknown options and invalid choices get "did you mean …?" (close spellings from
  ``difflib`` plus common synonyms such as ``--learning-rate`` for ``--lr``);
* ``raise_errors=True`` (a kernel must never ``SystemExit``) raises ``error_class`` with
  the usage and the message instead of printing them and exiting.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

from xflwb.errors import InputError

#: What people type → what our parsers call it (suggested only if the parser has it).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "--learning-rate": ("--lr", "--learningrate", "--rate", "--eta", "--step-size"),
    "--batch-size": ("--batch", "--batchsize", "--bs", "--mini-batch"),
    "--epochs": ("--epoch", "--num-epochs", "--n-epochs"),
    "--local-epochs": ("--local-epoch", "--epochs-per-round", "--client-epochs"),
    "--rounds": ("--round", "--num-rounds", "--n-rounds", "--num_rounds"),
    "--out": ("--output", "--out-dir", "--outdir", "--output-dir"),
    "--admin-token": ("--token", "--admin", "--api-token"),
    "--data-type": ("--datatype", "--dtype", "--type"),
    "--dataset": ("--data", "--data-set"),
    "--optimizer": ("--optim", "--opt"),
    "--min-clients": ("--clients", "--min-fit-clients", "--num-clients"),
    "--android": ("--androids", "--num-android", "--n-android"),
    "--ios": ("--iphones", "--num-ios", "--n-ios"),
    "--seed": ("--random-seed", "--random-state"),
    "--verbose": ("--debug", "--loud"),
}
_ALIASES = {alias: canon for canon, aliases in SYNONYMS.items() for alias in aliases}


class CommandLineError(InputError):
    """Bad arguments, raised (not printed-and-exited) by a ``raise_errors=True`` parser."""


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` (``--lr``, ``-p``, …), help excluded."""
    return [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]


def suggest(word: str, candidates: Iterable[str]) -> list[str]:
    """The candidates ``word`` was probably meant to be: synonym, spelling, then prefix."""
    cands = list(dict.fromkeys(candidates))
    key = word.split("=", 1)[0]
    norm = key.replace("_", "-").lower()
    if norm in cands and norm != key:
        return [norm]  # --batch_size → --batch-size
    found: list[str] = []
    canon = _ALIASES.get(key) or _ALIASES.get(norm)
    if canon in cands:
        return [canon]  # a known synonym is what was meant; spelling neighbours only confuse
    found += difflib.get_close_matches(norm, cands, n=3, cutoff=0.6)
    if key.startswith("-") and len(norm.lstrip("-")) >= 2:
        found += [c for c in cands if c.startswith(norm)]  # an abbreviation: name it in full
    return list(dict.fromkeys(found))[:3]


def _did_you_mean(found: Sequence[str]) -> str:
    return f"did you mean {' or '.join(found)}?" if found else ""


def explain(parser: argparse.ArgumentParser, message: str) -> str:
    """``message`` (an argparse error) with "did you mean" hints for what it complains of."""
    if message.startswith("unrecognized arguments: "):
        opts = option_strings(parser)
        hints = []
        for token in message[len("unrecognized arguments: "):].split():
            if token.split("=", 1)[0] in opts:  # right option, wrong place
                hints.append(f"{token.split('=', 1)[0]}: an option of '{parser.prog}', give "
                             "it after the command name")
            elif token.startswith("-") and not re.fullmatch(r"-\d.*", token):
                hint = _did_you_mean(suggest(token, opts))
                if hint:
                    hints.append(f"{token.split('=', 1)[0]}: {hint}")
        return message + ("\n  " + "\n  ".join(hints) if hints else "")
    m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
    if m:
        choices = re.findall(r"'([^']*)'", m.group(2)) or m.group(2).split(", ")
        hint = _did_you_mean([f"'{c}'" for c in suggest(m.group(1), choices)])
        return f"{message}; {hint}" if hint else message
    return message


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` with ``allow_abbrev=False``, "did you mean" hints, and
    ``raise_errors`` (raise ``error_class`` instead of exiting; sub-parsers inherit it)."""

    error_class: type[Exception] = CommandLineError

    def __init__(self, *args: Any, raise_errors: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.raise_errors = raise_errors

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", functools.partial(type(self),
                                                            raise_errors=self.raise_errors))
        return super().add_subparsers(**kwargs)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # complain as the sub-command that was running, with its options
            self._chosen(ns).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def _chosen(self, ns: argparse.Namespace) -> argparse.ArgumentParser:
        """The deepest sub-command parser ``ns`` went through (self if none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and action.dest not in (
                    None, argparse.SUPPRESS):
                chosen: str | None = getattr(ns, action.dest, None)
                sub = None if chosen is None else action.choices.get(chosen)
                if sub is not None:
                    return sub._chosen(ns) if isinstance(sub, Parser) else sub
        return self

    def error(self, message: str) -> Any:
        message = explain(self, message)
        if self.raise_errors:
            raise self.error_class(f"{self.format_usage().strip()}\n{self.prog}: error: "
                                   f"{message}")
        return super().error(message)
