"""The one validator of option mappings: config files, job files (top level, jobs, verify blocks), the analysis
options and verify's thresholds.

A schema is a table ``key -> Key(types, expected, choices, range)``; :func:`check` walks a mapping against it and
raises :class:`ConfigError` naming the key (its dotted path), the source (a file, or the Python object that took
the options) and the line, with the fix. :func:`from_annotation` makes the row of a dataclass field from its type
annotation, so QuantConfig and SearchConfig need no table of their own. Settings layer: imports only errors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

NUMBER = (int, float)
NONE = type(None)


@dataclass(frozen=True)
class Key:
    """One key's rule: accepted ``types`` (bool is never an int here unless listed), ``expected`` (what to write,
    in the message and the fix), ``items`` (the element type of a list, the value type of a string-keyed mapping),
    ``choices`` (allowed values; for a list, allowed elements), ``also`` (literals accepted as they are) and a range [low, high] (``open_low``: > low)."""

    types: tuple[type, ...]
    expected: str
    items: type | tuple[type, ...] | None = None
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    fix: str = ""
    also: tuple = ()  # literal values accepted as they are (min_agreement: "auto")


def where(source: str, line: int | None) -> str:
    """'file, line N' (or just the source where the line is unknown: JSON, the Python API)."""
    return f"{source}" + (f", line {line}" if line else "")


def unknown(path: str, at: str, known, label: str = "", fix: str = "") -> ConfigError:
    """The error of a key the schema does not have."""
    return ConfigError(f"unknown {label or 'key '}{path!r} in {at}", fix or f"remove it or use one of: {', '.join(known)}")


def _is(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def check_value(path: str, value: Any, rule: Key, at: str, label: str = "") -> None:
    """One value against its rule: type (and element type), choices, range."""
    name = path.rpartition(".")[2]
    if any(value == a and type(value) is type(a) for a in rule.also):
        return
    ok = _is(value, rule.types)
    if ok and rule.items is not None and isinstance(value, (list, tuple)):
        ok = all(_is(v, rule.items) for v in value)
    elif ok and rule.items is not None and isinstance(value, dict):
        ok = all(isinstance(k, str) and _is(v, rule.items) for k, v in value.items())
    if not ok:
        raise ConfigError(f"{label}{path!r} in {at} must be {rule.expected}, got {value!r}",
                          rule.fix or f"change {name} to {rule.expected}")
    if rule.choices and value is not None:
        bad = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v not in rule.choices]
        if bad:
            raise ConfigError(f"{label}{path!r} in {at} must be {'some' if isinstance(value, (list, tuple)) else 'one'}"
                              f" of {', '.join(map(str, rule.choices))}; got {value!r}",
                              rule.fix or f"set {name} to {'some' if isinstance(value, (list, tuple)) else 'one'} of "
                              "the listed values")
    if _is(value, NUMBER) and (rule.low is not None or rule.high is not None):
        low = -math.inf if rule.low is None else rule.low
        high = math.inf if rule.high is None else rule.high
        inside = (value > low if rule.open_low else value >= low) and value <= high
        if not inside:
            bound = (f"> {low:g}" if rule.open_low else f">= {low:g}") if high == math.inf else \
                f"in {'(' if rule.open_low else '['}{low:g}, {high:g}]"
            raise ConfigError(f"{label}{path!r} in {at} must be {bound}, got {value!r}",
                              rule.fix or f"set {name} {bound}")


def check(data: Mapping[str, Any], schema: Mapping[str, Key], source: str, lines: Mapping[str, int] | None = None,
          prefix: str = "", label: str = "", skip: tuple[str, ...] = ()) -> None:
    """Every key of ``data`` against ``schema``: unknown keys, types, choices, ranges. ``lines``: key (dotted below
    the mapping) -> line; ``prefix``: the mapping's own path shown before each key (``jobs[0].verify``); ``label``:
    the message's noun before the key (``config key ``); ``skip``: keys another check owns."""
    lines = lines or {}
    for key, value in data.items():
        if key in skip:
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        at = where(source, lines.get(key))
        if key not in schema:
            raise unknown(path, at, schema, label)
        check_value(path, value, schema[key], at, label)


_SCALARS = {"str": (str, "a string"), "bool": (bool, "true or false"), "int": (int, "an integer"),
            "float": (NUMBER, "a number")}


def from_annotation(annotation: Any) -> Key:
    """The rule of a dataclass field from its (string) annotation: ``int``, ``float | None``, ``tuple[str, ...]``,
    ``dict[str, int]``, ``float | str | None`` (any member will do)."""
    ann = str(annotation)
    optional = (NONE,) if "None" in ann else ()
    if ann.startswith("dict[str, int]"):
        return Key((dict,) + optional, "a mapping of strings to integers", items=int)
    if ann.startswith("dict"):
        return Key((dict,) + optional, "a mapping of strings to strings", items=str)
    if ann.startswith("tuple"):
        return Key((list, tuple) + optional, "a list of strings", items=str)
    bases = [b.strip() for b in ann.split("|") if b.strip() != "None"]
    types: tuple[type, ...] = ()
    for b in bases:
        t = _SCALARS.get(b, (object, b))[0]
        types += t if isinstance(t, tuple) else (t,)
    return Key(types + optional, " or ".join(_SCALARS.get(b, (object, b))[1] for b in bases))


def from_dataclass(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Key]:
    """The schema of a dataclass's fields: each row from the field's annotation, with the ``choices`` its metadata
    gives the command line (``option(..., choices=...)`` in converter/config.py) unless a ``type`` function there
    rewrites the value first (search.metric's aliases)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        rule = from_annotation(f.type)
        cli = f.metadata.get("cli", {})
        if cli.get("choices") and cli.get("type") in (None, int, float, str):
            rule = dataclasses.replace(rule, choices=tuple(cli["choices"]))
        out[f.name] = rule
    return out
