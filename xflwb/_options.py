"""Each option set declared once: a dataclass whose fields carry their help and bounds.

``SessionConfig``, ``SimulationConfig``, ``DeviceOptions`` and ``BackendOptions`` are plain
dataclasses; each field made with :func:`option` says what it means, its bounds and whether
a front-end shows it. From that one declaration come

* the validation (:func:`check`: types, bounds, choices, with the field's name in the error),
* the argparse options of the ``xflwb`` command and of the magics (:func:`add_arguments`,
  :func:`given`),
* the FastAPI request body (:func:`request_model`),
* the signature and docstring of the Python functions (:func:`signature`, :func:`doc`),
* the option tables in docs/options.md (:func:`markdown_table`, checked by the tests).

Hand-written because nothing on PyPI fits all four at once: ``pydantic`` dataclasses would
give the HTTP side only, and argparse generators (``simple-parsing``, ``tyro``) bring
their own parser classes, without our "did you mean" manners (``xflwb._argparse``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from xflwb.errors import InputError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_KEY = "xflwb"
_NONE_WORDS = ("none", "null")
#: longest spec string a ``text`` option takes over HTTP (``"up=rotate+int8,down=fp16"``
#: is 25 characters)
_TEXT_MAX = 256
_T = TypeVar("_T", bound="DataclassInstance")  # a dataclass type (``declared``)


class OptionError(InputError):
    """A user's bad option value or choice: one line that names the option and the fix.

    Raised at the public API's boundary without its internal frames (:func:`boundary`);
    ``%load_ext xflwb`` shows it in a notebook as that one line, without a traceback."""


class UnknownOptionError(OptionError, TypeError):
    """A keyword no option set declares (a ``TypeError`` as Python's own for an unexpected
    keyword argument, and an :class:`OptionError`)."""


OptionError.__module__ = UnknownOptionError.__module__ = "xflwb"  # public: xflwb.OptionError


def did_you_mean(word: Any, choices: Iterable[Any]) -> str:
    """``" did you mean 'fedbuff'?"`` for the choice closest to ``word`` (difflib), or ""."""
    texts = {str(c).lower(): c for c in choices}
    found = difflib.get_close_matches(str(word).lower(), list(texts), n=1, cutoff=0.6)
    return f" did you mean {texts[found[0]]!r}?" if found else ""


def boundary(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` raising its :class:`OptionError` from its own frame, ``from None``: a
    user's typo shows as the call and one line, not as the validation's internals and a
    chain of "during handling of the above exception"."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OptionError as exc:
            raise exc.with_traceback(None) from None

    return wrapper


def declared(cls: type[_T]) -> type[_T]:
    """Class decorator (above ``@dataclass``): ``cls(**kw)`` refuses a keyword it does not
    declare with "did you mean" (:func:`unknown`) instead of the bare ``TypeError`` of the
    dataclass ``__init__``, and raises its option errors from the caller's line."""
    init = cls.__init__
    where = f"xflwb.{cls.__name__}"

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fields = {f.name for f in dataclasses.fields(cls)}
            if any(k not in fields for k in kwargs):
                unknown(cls, [k for k in kwargs if k not in fields], where)
            init(self, *args, **kwargs)
        except OptionError as exc:
            raise exc.with_traceback(None) from None

    cls.__init__ = __init__  # type: ignore[method-assign]  # the point: a checked __init__
    return cls


@dataclasses.dataclass(frozen=True)
class Spec:
    """What :func:`option` records about a field."""

    help: str
    choices: tuple[Any, ...] | None = None
    ge: float | None = None  # bounds (inclusive ge/le, exclusive gt/lt)
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    front: bool = True  # shown by the Python API, the CLI, the magics and HTTP
    aliases: tuple[str, ...] = ()  # extra CLI spellings (hidden from the tables)
    metavar: str | None = None
    path: bool = False  # a str option that also takes a ``pathlib.Path``
    repeat: bool = False  # a list option given once per item on a command line
    #: a dict option also written as a spec string (``"up=int8,down=fp16"``), which the
    #: dataclass parses: command lines pass the text as typed (JSON if it starts with "{"),
    #: the admin body takes the string or the object
    text: bool = False


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
           choices: Iterable[Any] | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           front: bool = True, aliases: Iterable[str] = (), metavar: str | None = None,
           path: bool = False, repeat: bool = False, text: bool = False,
           repr: bool = True) -> Any:
    """A dataclass field with its help, bounds and visibility (``front=False``: set by the
    program, never by a user: no CLI option, no HTTP field)."""
    spec = Spec(help=help, choices=tuple(choices) if choices is not None else None, ge=ge,
                gt=gt, le=le, lt=lt, front=front, aliases=tuple(aliases), metavar=metavar,
                path=path, repeat=repeat, text=text)
    kw: dict[str, Any] = {"metadata": {_KEY: spec}, "repr": repr}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    else:
        kw["default"] = default
    return dataclasses.field(**kw)


@dataclasses.dataclass(frozen=True)
class Opt:
    """One declared option, resolved: its name, type, default and :class:`Spec`."""

    name: str
    kind: type  # int, float, str, bool, dict or list (the non-None part of the annotation)
    nullable: bool
    default: Any
    spec: Spec

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def _resolve(annotation: Any) -> tuple[type, bool]:
    """``int | None`` → (int, True); ``dict[str, Any]`` → (dict, False)."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        kind, _ = _resolve(rest[0])
        return kind, len(rest) < len(args)
    if origin is not None:
        return origin, False
    return annotation, False


def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)`` with names looked up where ``cls`` and its bases were
    written: a public class's ``__module__`` is ``"xflwb"`` (``xflwb/__init__.py`` sets it),
    where typing would otherwise look, and its annotations' names are not there."""
    written_in: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        init = inspect.unwrap(vars(base).get("__init__", object.__init__))  # past declared()
        written_in.update(getattr(init, "__globals__", {}))
    return typing.get_type_hints(cls, localns=written_in)


def options(cls: type, *, front_only: bool = True) -> list[Opt]:
    """The declared options of the dataclass ``cls``, in declaration order."""
    hints = type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_KEY)
        if spec is None or (front_only and not spec.front):
            continue
        kind, nullable = _resolve(hints[f.name])
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        found.append(Opt(f.name, kind, nullable, default, spec))
    return found


def names(cls: type) -> list[str]:
    """The names a user may set (the front options)."""
    return [o.name for o in options(cls)]


# -- validation --------------------------------------------------------------------------------
def _num(x: float) -> str:
    return f"{int(x):,}".replace(",", "_") if float(x).is_integer() and abs(x) >= 1e6 else f"{x:g}"


def describe(o: Opt) -> str:
    """"a positive integer", "a number in (0, 1]", … for error messages and tables."""
    s = o.spec
    if o.kind is bool:
        what = "True or False"
    elif s.choices is not None:
        what = "one of " + ", ".join(repr(c) for c in s.choices)
    elif o.kind in (int, float):
        noun = "an integer" if o.kind is int else "a number"
        low = (("[", s.ge) if s.ge is not None else ("(", s.gt) if s.gt is not None
               else None)
        high = ((s.le, "]") if s.le is not None else (s.lt, ")") if s.lt is not None
                else None)
        at_most = f" (at most {_num(high[0])})" if high and high[1] == "]" else ""
        if (o.kind is int and low == ("[", 1)) or (low == ("(", 0) and (
                not high or high[0] > 1)):
            what = f"a positive {'integer' if o.kind is int else 'number'}{at_most}"
        elif low and high:
            what = f"{noun} in {low[0]}{_num(low[1])}, {_num(high[0])}{high[1]}"
        elif low and low == ("[", 0):
            what = f"a non-negative {'integer' if o.kind is int else 'number'}"
        elif low:
            what = f"{noun} {'>=' if low[0] == '[' else '>'} {_num(low[1])}"
        elif high:
            what = f"{noun} {'<=' if high[1] == ']' else '<'} {_num(high[0])}"
        else:
            what = noun
    else:
        kinds: dict[type, str] = {str: "a string", dict: "a dict", list: "a list"}
        what = kinds.get(o.kind, o.kind.__name__)
        if s.text:
            what += ", a spec string"
    return what + (" or None" if o.nullable else "")


def check_value(o: Opt, v: Any) -> Any:
    """``v`` checked against ``o`` (ints accepted for floats); raises :class:`OptionError`
    (a ``ValueError``) naming the option, what it takes, what it got and, for a choice,
    the closest one."""
    def bad() -> OptionError:
        hint = (did_you_mean(v, o.spec.choices) if o.spec.choices is not None
                and isinstance(v, str) else "")
        return OptionError(f"{o.name} must be {describe(o)}, got {v!r};{hint}"
                           if hint else f"{o.name} must be {describe(o)}, got {v!r}")

    if v is None:
        if o.nullable:
            return v
        raise bad()
    if o.kind is bool:
        if not isinstance(v, bool):
            raise bad()
        return v
    if o.kind in (int, float):
        allowed = (int,) if o.kind is int else (int, float)
        if isinstance(v, bool) or not isinstance(v, allowed):
            raise bad()
        if o.kind is float and not math.isfinite(float(v)):
            raise bad()
        s = o.spec
        if ((s.ge is not None and v < s.ge) or (s.gt is not None and v <= s.gt)
                or (s.le is not None and v > s.le) or (s.lt is not None and v >= s.lt)):
            raise bad()
    elif o.kind is str and o.spec.path and isinstance(v, os.PathLike):
        return v
    elif ((o.kind in (str, dict, list) and not isinstance(v, o.kind))
          or (o.spec.repeat and not all(isinstance(x, str) for x in v))):
        raise bad()
    if o.spec.choices is not None and v not in o.spec.choices:
        raise bad()
    return v


#: how many times each option class (by name) was validated in this process: options are
#: validated once per start, on the way in (tests/test_validated_once.py reads it)
validations: collections.Counter[str] = collections.Counter()


def check(obj: Any) -> None:
    """Validate every declared field of the dataclass instance ``obj`` (its
    ``__post_init__`` calls this, then checks what spans several fields)."""
    validations[type(obj).__name__] += 1
    for o in options(type(obj), front_only=False):
        check_value(o, getattr(obj, o.name))


def restore(cls: type[_T], stored: dict[str, Any]) -> _T:
    """An instance of the option dataclass ``cls`` from the JSON xflwb itself stored after
    validating it (a session row's config), WITHOUT validating again: its values are
    already the checked, normalised ones. A key ``cls`` does not declare (written by a
    newer xflwb) is refused with an :class:`OptionError` naming it; a stored config that
    lacks fields (written by an older xflwb) is built with ``cls(**stored)``, which fills
    and checks them."""
    if not isinstance(stored, dict):
        raise OptionError(f"a stored {cls.__name__} must be a JSON object, got "
                          f"{type(stored).__name__}")
    fields = dataclasses.fields(cls)
    declared_names = {f.name for f in fields}
    extra = sorted(k for k in stored if k not in declared_names)
    if extra:
        raise OptionError(
            f"the stored {cls.__name__} has option(s) {', '.join(map(repr, extra))} this "
            f"xflwb does not know: it was written by a newer xflwb; upgrade xflwb here "
            f"(pip install -U xflwb) or start the session again with this one")
    if any(f.name not in stored for f in fields if f.init):
        return cls(**stored)  # an older xflwb's config: its new fields filled and checked
    obj = object.__new__(cls)
    for f in fields:
        object.__setattr__(obj, f.name, stored[f.name])
    return obj


def unknown(cls: type | Iterable[type], given: Iterable[str], where: str) -> None:
    """Raise :class:`UnknownOptionError` (a ``TypeError``) for keywords the declaration(s)
    ``cls`` do not declare, in one line with "did you mean" (the close spellings and
    synonyms of the parsers, ``xflwb._argparse.suggest``)."""
    from xflwb._argparse import SYNONYMS, suggest

    classes = (cls,) if isinstance(cls, type) else tuple(cls)
    known = [n for c in classes for n in names(c)]
    every = {f.name for c in classes for f in dataclasses.fields(c)}
    bad = [k for k in given if k not in known and k not in every]
    if not bad:
        return
    hints = []
    for k in bad:
        flag = "--" + str(k).replace("_", "-")
        found = [f[2:].replace("-", "_") for f in suggest(flag, ["--" + n.replace("_", "-")
                                                                 for n in known])
                 if flag in SYNONYMS.get(f, ()) or f.startswith(flag)
                 # the flags' shared "--" makes 'lr' look like 'port': judge the bare names
                 or difflib.SequenceMatcher(None, str(k), f[2:].replace("-", "_")).ratio()
                 >= 0.6]
        hint = f": did you mean {found[0]!r}?" if found else ""
        hints.append(f"{k!r}{hint}")
    noun = "an unexpected option" if len(bad) == 1 else "unexpected options"
    takes = "" if all("did you mean" in h for h in hints) else (
        f" (it takes {', '.join(known)})")
    raise UnknownOptionError(f"{where} got {noun} {'; '.join(hints)}{takes}")


# -- argparse ------------------------------------------------------------------------------------
def _cli_type(o: Opt, per_item: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if per_item and "," in text and o.kind not in (dict, list):
            return [parse(part) for part in text.split(",")]
        if o.nullable and text.lower() in _NONE_WORDS:
            return None
        if o.spec.text and not text.lstrip().startswith("{"):
            return text  # a spec string: the dataclass parses it, with its own errors
        if o.kind in (dict, list):
            value = json.loads(text)
            if not isinstance(value, o.kind):
                raise ValueError(text)
            return value
        return o.kind(text)

    parse.__name__ = ("SPEC or JSON" if o.spec.text else "JSON" if o.kind in (dict, list)
                      else o.kind.__name__)
    return parse


def _help(o: Opt) -> str:
    text = o.spec.help
    if o.kind is bool:
        return text
    default = o.default
    if (isinstance(default, dict | list) and not default) or (default is None
                                                               and "none:" in text):
        return text
    shown = "none" if default is None else json.dumps(default) if isinstance(
        default, dict | list) else default
    return f"{text} (default: {shown})" if text else f"(default: {shown})"


def add_arguments(parser: argparse.ArgumentParser, cls: type, *,
                  exclude: Iterable[str] = (), only: Iterable[str] | None = None,
                  positional: Iterable[str] = (), per_item: bool = False) -> None:
    """Add ``cls``'s front options to ``parser`` as ``--kebab-case`` options.

    Defaults stay in the dataclass: an option the user does not give is absent from the
    namespace (``argparse.SUPPRESS``), so :func:`given` passes only what was typed and the
    declaration's default applies everywhere. Booleans are ``--flag`` / ``--no-flag``;
    dicts and lists take JSON; ``none`` sets an optional option to None; ``per_item``:
    ``1,1,10`` gives one value per item (a fleet's devices)."""
    skip = set(exclude)
    keep = set(only) if only is not None else None
    pos = set(positional)
    for o in options(cls):
        if o.name in skip or (keep is not None and o.name not in keep):
            continue
        if o.name in pos:
            parser.add_argument(o.name, type=_cli_type(o), help=o.spec.help)
            continue
        kw: dict[str, Any] = {"dest": o.name, "default": argparse.SUPPRESS, "help": _help(o)}
        if o.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif o.spec.repeat:
            kw["action"] = "append"
            if o.spec.metavar:
                kw["metavar"] = o.spec.metavar
        else:
            kw["type"] = _cli_type(o, per_item)
            if o.spec.choices is not None and not per_item:
                kw["choices"] = list(o.spec.choices)
            if o.spec.metavar:
                kw["metavar"] = o.spec.metavar
            elif o.kind in (dict, list):
                kw["metavar"] = "JSON"
            elif o.kind in (int, float) and o.spec.choices is None:
                kw["metavar"] = "N" if o.kind is int else "X"
        if o.required:
            kw["required"] = True
            kw.pop("default")
        parser.add_argument(o.flag, *o.spec.aliases, **kw)


def given(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` the user gave on the command line (as keyword arguments)."""
    return {o.name: getattr(ns, o.name) for o in options(cls) if hasattr(ns, o.name)}


# -- FastAPI body ---------------------------------------------------------------------------------
def request_model(cls: type, model_name: str, base: type, *,
                  exclude: Iterable[str] = (), extra: dict[str, tuple[Any, Any]] | None = None
                  ) -> Any:
    """A pydantic model of ``cls``'s front options (bounds → ``Field`` constraints, help →
    description) on ``base``, plus ``extra`` fields (``name: (type, Field(...))``)."""
    import pydantic

    hints = type_hints(cls)
    skip = set(exclude)
    fields: dict[str, Any] = {}
    for o in options(cls):
        if o.name in skip:
            continue
        annotation: Any = hints[o.name]
        if o.spec.choices is not None:
            lit = typing.Literal[tuple(o.spec.choices)]  # type: ignore[valid-type]
            annotation = lit | None if o.nullable else lit
        elif o.spec.text:  # the object, or its spec string (the dataclass parses both)
            spec_text = typing.Annotated[str, pydantic.StringConstraints(max_length=_TEXT_MAX)]
            annotation = annotation | spec_text
        kw: dict[str, Any] = {"description": o.spec.help or None}
        for bound in ("ge", "gt", "le", "lt"):
            value = getattr(o.spec, bound)
            if value is not None:
                kw[bound] = value
        if isinstance(o.default, dict | list):
            default = o.default
            kw["default_factory"] = lambda d=default: type(d)(d)
        elif not o.required:
            kw["default"] = o.default
        fields[o.name] = (annotation, pydantic.Field(**kw))
    fields.update(extra or {})
    return pydantic.create_model(model_name, __base__=base, **fields)


# -- Python signatures -------------------------------------------------------------------------
def signature(func: Callable[..., Any], *classes: type,
              exclude: Iterable[str] = ()) -> inspect.Signature:
    """``func``'s signature with its ``**options`` replaced by the front options of
    ``classes`` as keyword-only parameters (what ``help()``, IDEs and Jupyter's ``?``
    show)."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in params} | set(exclude)
    added = []
    for cls in classes:
        hints = type_hints(cls)
        for o in options(cls):
            if o.name not in taken:
                taken.add(o.name)
                added.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY,
                                               default=o.default, annotation=hints[o.name]))
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                  p.VAR_POSITIONAL)]
    keyword = [p for p in params if p.kind is p.KEYWORD_ONLY]
    return sig.replace(parameters=positional + added + keyword)


def doc(*classes: type, exclude: Iterable[str] = ()) -> str:
    """The options section of a docstring: one line per front option of ``classes``."""
    skip = set(exclude)
    lines = []
    for cls in classes:
        lines.append(f"Options ({cls.__name__}):")
        for o in options(cls):
            if o.name not in skip:
                lines.append(f"    {o.name} = {o.default!r}: {o.spec.help} [{describe(o)}]")
    return "\n".join(lines)


def generated(*classes: type, exclude: Iterable[str] = ()
              ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``func(…, **options)`` shows and documents the options of ``classes``."""
    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        outer = boundary(func)  # an option error shows from the user's call
        outer.__signature__ = signature(func, *classes,  # type: ignore[attr-defined]
                                        exclude=exclude)
        outer.__doc__ = (inspect.cleandoc(func.__doc__ or "") + "\n\n"
                         + doc(*classes, exclude=exclude))
        return outer

    return wrap


# -- docs -----------------------------------------------------------------------------------------
def markdown_table(cls: type, *, exclude: Iterable[str] = ()) -> str:
    """The docs/options.md table of ``cls``'s front options: Python name, CLI flag, default,
    meaning."""
    skip = set(exclude)
    rows = ["| option | command line | default | takes | meaning |",
            "|---|---|---|---|---|"]
    for o in options(cls):
        if o.name in skip:
            continue
        default = "required" if o.required else f"`{o.default!r}`"
        flag = (f"{o.flag} / --no-{o.flag[2:]}" if o.kind is bool
                else f"{o.flag} X (repeatable)" if o.spec.repeat else o.flag)
        rows.append(f"| `{o.name}` | `{flag}` | {default} | {describe(o)} | "
                    f"{o.spec.help.replace('|', '/')} |")
    return "\n".join(rows)
