"""Recipe files: an options dataclass (`compress.CompressOptions`) written to and read from TOML or JSON, with
the options' own types.

Deployment pipelines keep their settings in files (Olive's JSON recipes, NNCF's config; issue 26). A recipe is
every setting of `compress` in one file: `onnxecc compress MODEL --config recipe.toml` reads it, flags given on
the command line override it (`merge`), `--print-config` shows the effective one (`to_toml`), and the compress
report embeds it (`as_dict`, under "recipe") so a run can be repeated from its report.

The schema is the dataclass itself: one key per field, typed by the field's annotation (str, int, float, bool,
`X | None`, `tuple[X, ...]`, `dict[K, V]`), so a field added to `CompressOptions` is a recipe key without a
change here. The class is a parameter, not an import: `compress` embeds recipes in its report without an import
cycle, and other verbs' options can have recipes the same way.

A file may leave keys out (the defaults hold). TOML has no null: a field left at None is written as a comment and
read back as its default, which is None for every optional field (`to_toml` refuses otherwise; JSON writes null).
`input_shapes`' key for "the model's only input" (None, as `--input-shape 1,3,64,64` gives it) is written as the
empty name "".
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import numbers
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser before it joined the standard library (a dependency there: pyproject.toml)
    import tomli as tomllib

from onnxecc.core.errors import UserError

FORMATS = (".toml", ".json")


@cache
def settings(cls: type) -> dict[str, object]:
    """The recipe keys of the options dataclass `cls` and their types: every field except those marked
    `field(metadata={"recipe": False})` — fields that are not settings (a callback, a live object) cannot be
    written to a file, and a run repeated from its recipe would not need them (`CompressOptions` has none today)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("recipe", True)}


def as_dict(options) -> dict:
    """The recipe of `options` as plain JSON values (tuples as lists, the unnamed input as ""); `from_dict` reads
    it back to equal options."""
    out = {name: _plain(getattr(options, name)) for name in settings(type(options))}
    for name, hint in settings(type(options)).items():  # a float setting given as 3: written 3.0, as its type says
        if hint in (float, float | None) and isinstance(out[name], int):
            out[name] = float(out[name])
    return out


def from_dict(cls: type, values: Mapping, source: str):
    """Options `cls` from a recipe's keys (the others at their defaults). An unknown key or a value of the wrong
    type is a one-line UserError that names the key, the nearest valid key or the expected type, and `source`
    (where the values came from, e.g. "--config recipe.toml")."""
    if not isinstance(values, Mapping):
        raise UserError(f"{source}: a recipe is a table of settings (key = value), not {_kind(values)}")
    known = settings(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.0)
            raise UserError(f"{source}: unknown key {key!r}; the nearest valid key is {near[0]!r} "
                            "(`onnxecc compress MODEL --print-config` lists them all)")
        kwargs[key] = _typed(value, known[key], key, source)
    return cls(**kwargs)


def merge(base, flags, given: Iterable[str]):
    """`base` (a recipe file's options) with the fields named in `given` taken from `flags`: the command line
    overrides the file only where a flag was given, a flag left at its default does not."""
    given = set(given)
    unknown = given - set(settings(type(base)))
    if unknown:
        raise ValueError(f"not recipe settings: {sorted(unknown)}")
    return dataclasses.replace(base, **{name: getattr(flags, name) for name in given})


def load(path: str | Path, cls: type):
    """The options (`cls`) of a recipe file (.toml or .json). A compress report (JSON with a "recipe" object)
    also works: its recipe repeats the run. A missing or unreadable file is a UserError naming it and --config."""
    path = Path(path)
    source = f"--config {path}"
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"{source}: give a .toml or .json recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{source}: cannot read it ({exc})") from None
    try:
        values = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise UserError(f"{source}: not valid {kind} ({exc})") from None
    if isinstance(values, dict) and isinstance(values.get("recipe"), dict) and values.get("tool") == "onnxecc":
        values = values["recipe"]  # a compress --report
    return from_dict(cls, values, source)


def save(options, path: str | Path) -> Path:
    """Write the recipe of `options` to `path`, TOML or JSON by its suffix (atomically)."""
    from onnxecc.core import atomic

    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{path}: a recipe file is .toml or .json")
    text = to_toml(options) if suffix == ".toml" else json.dumps(as_dict(options), indent=2) + "\n"
    return atomic.write_bytes(path, text.encode())


def to_toml(options) -> str:
    """The recipe of `options` as TOML: one `key = value` line per setting, a None as a comment line, tables
    (input_shapes) last, as TOML requires."""
    defaults = type(options)()
    lines = ["# onnxecc compress recipe: `onnxecc compress MODEL --config FILE`; flags given override it"]
    tables = []
    for name, value in as_dict(options).items():
        if value is None:
            if getattr(defaults, name) is not None:  # leaving it out would read back as the default
                raise ValueError(f"{name} is None but defaults to {getattr(defaults, name)!r}: TOML has no null, "
                                 "write the recipe as JSON")
            lines.append(f"# {name}: not set")
        elif isinstance(value, dict):
            tables.append((name, value))
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[{name}]"] + [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _plain(value):
    """A JSON value for an option's value: tuples as lists, dict keys as strings (None as "")."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {"" if k is None else str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise TypeError(f"{value!r} ({type(value).__name__}) is not a recipe value")


class _WrongType(Exception):
    """A value that does not have its type: `_typed` names the key (`path` inside a table) and the type."""

    def __init__(self, value, hint, path: tuple[str, ...] = ()):
        super().__init__(value, hint, path)
        self.value, self.hint, self.path = value, hint, path


def _typed(value, hint, key: str, source: str):
    try:
        return _convert(value, hint)
    except _WrongType as e:
        where = ".".join([key, *(json.dumps(p) if not p.isidentifier() else p for p in e.path)])
        raise UserError(f"{source}: {where} = {_short(e.value)} is {_kind(e.value)}; expected "
                        f"{_describe(e.hint)}") from None


def _convert(value, hint):
    """`value` as the type `hint` (JSON/TOML values: lists for tuples, "" for a None dict key), or _WrongType."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:  # `X | None`: X's own error (with the entry of a table that is wrong)
            return _convert(value, rest[0])
        for option in rest:
            try:
                return _convert(value, option)
            except _WrongType:
                pass
        raise _WrongType(value, hint)
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"recipe: fixed-length tuple types are not supported ({hint})")
        if not isinstance(value, (list, tuple)):
            raise _WrongType(value, hint)
        try:
            return tuple(_convert(v, args[0]) for v in value)
        except _WrongType:
            raise _WrongType(value, hint) from None
    if origin is dict or hint is dict:
        if not args:
            raise TypeError("recipe: annotate a dict option with its key and value types, e.g. dict[str, int]")
        if not isinstance(value, Mapping):
            raise _WrongType(value, hint)
        unnamed = type(None) in typing.get_args(args[0])  # "" is the None key (`input_shapes`: the only input)
        out = {}
        for k, v in value.items():
            try:
                out[None if unnamed and k == "" else _convert(k, args[0])] = _convert(v, args[1])
            except _WrongType as e:
                raise _WrongType(e.value, e.hint, (str(k), *e.path)) from None
        return out
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # TOML and JSON write 3.0 as 3 at will
    if hint in (bool, int, float, str):
        if type(value) is hint:  # exactly: a bool is no integer here, a number no string
            return value
        raise _WrongType(value, hint)
    raise TypeError(f"recipe: options of type {hint} are not supported (mark the field "
                    "field(metadata={'recipe': False}) if it is not a setting)")


def _describe(hint) -> str:
    """What a value of type `hint` looks like in a recipe file, for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in rest)
        return text + (" (or left out: not set)" if len(rest) < len(args) else "")
    if origin is tuple:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a table of {_plural(args[1])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _plural(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_plural(a) for a in typing.get_args(hint) if a is not type(None))
    if origin is tuple:
        return f"lists of {_plural(typing.get_args(hint)[0])}"
    return {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(hint, str(hint))


def _kind(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), f"a {type(value).__name__}")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # Python's shortest round-trip form is valid TOML (1e-05, 0.0025, inf, -inf, nan)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped (TOML's rule), the rest literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch, f"\\u{ord(ch):04X}"))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
