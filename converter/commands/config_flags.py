"""Command-line flags from the config fields: every QuantConfig / SearchConfig flag comes from its field's
``option(...)`` in :mod:`converter.config` (flags, help, argparse keywords written once). ``qconvert quantize``
groups them by config section (:func:`add_config_flags`), ``analyze`` takes a few of them; :func:`config_from_args`
lays what the command line gave over a config (the --config file's). CLI layer (argparse); converter.config
stays free of it: a field's ``type`` converter raises ValueError, turned here into argparse's message.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..config import QuantConfig, SearchConfig


def _argtype(fn):
    """A config field's converter as an argparse ``type``: its ValueError message becomes the usage error."""
    if fn in (int, float, str):
        return fn

    def convert(text: str):
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = fn.__name__
    return convert


def _default_text(value) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_config_flags(groups: dict, cls=QuantConfig, only: tuple[str, ...] | None = None) -> list[argparse.Action]:
    """The command-line flags of ``cls``'s fields, from their metadata (converter.config.option), into
    ``groups[section]``; ``only``: these fields alone. Returns the actions added."""
    actions = []
    for f in dataclasses.fields(cls):
        flags, meta = f.metadata.get("flags"), f.metadata
        if not flags or (only is not None and f.name not in only):
            continue
        g = groups[meta["path"].split(".")[0]]
        kw = dict(meta["cli"])
        action, dest = kw.pop("action", None), kw.pop("dest", f.name)
        if "type" in kw:
            kw["type"] = _argtype(kw["type"])
        text = meta["help"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if "default" not in text and action not in ("store_true", "store_false"):
            text += f" (default: {_default_text(default)})"
        if action == "per_channel":  # one field, two flags: --per-channel / --per-tensor
            on, off = text.split("|")
            m = g.add_mutually_exclusive_group()
            actions.append(m.add_argument(flags[0], dest=dest, action="store_true", default=None, help=on))
            actions.append(m.add_argument(flags[1], dest=dest, action="store_false", help=off))
            continue
        if action == "BooleanOptionalAction":
            kw["action"] = argparse.BooleanOptionalAction
        elif action is not None:
            kw["action"] = action
        actions.append(g.add_argument(flags[0], dest=dest, default=None, help=text, **kw))
        for old in flags[1:]:  # an old spelling: still parses, hidden from --help
            g.add_argument(old, dest=dest, default=None, help=argparse.SUPPRESS, **kw)
    return actions


def _dest(f: dataclasses.Field) -> str:
    return f.metadata["cli"].get("dest", f.name)


def config_from_args(args: argparse.Namespace, config: QuantConfig, only: tuple[str, ...] | None = None
                     ) -> QuantConfig:
    """``config`` (the --config file's, or the defaults) with every config flag given on the command line; the
    search flags go into its search section (a new one where --target-metric or --evaluator is given). ``only``:
    these QuantConfig fields alone, no search (a command that took only them, as analyze)."""
    overrides = {}
    for f in dataclasses.fields(QuantConfig):
        value = getattr(args, _dest(f), None)  # a flag added by hand with dest=<field> counts too
        if value is None or (f.name == "exclude_nodes" and not value) or (only is not None and f.name not in only):
            continue
        if f.metadata["cli"].get("action") == "append":  # adds to the config file's
            value = getattr(config, f.name) + tuple(value)
        overrides[f.name] = value
    search = {f.name: getattr(args, _dest(f)) for f in dataclasses.fields(SearchConfig)  # a file key only: no flag
              if f.metadata["flags"] and getattr(args, _dest(f), None) is not None} if only is None else {}
    if search:
        base = config.search if config.search is not None and not ({"metric", "evaluator"} & set(search)) else None
        overrides["search"] = base.replace(**search) if base is not None else \
            SearchConfig(**{**(config.search.to_dict() if config.search else {}), **search})
    return config.replace(**overrides) if overrides else config


