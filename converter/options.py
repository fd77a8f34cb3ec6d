"""Option values and output locations shared by the CLI and the library.

The CLI (``converter.cli``) is the top layer: modules below it (``graph.validate``, ``verify``,
``analysis``, ``batch``) take their argument types and output checks from here, never from the CLI.
Every check here runs before any long work, so a bad output location fails in the first second.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from .config import QuantConfig, SearchConfig
from .errors import OutputError

# What ``quantize`` writes for a model named NAME (the stem of the input file unless --name says otherwise).
QDQ_SUFFIX = ".qdq.onnx"
ENCODINGS_SUFFIX = ".encodings"
REPORT_SUFFIX = ".report.json"
OUTPUT_SUFFIXES = (QDQ_SUFFIX, ENCODINGS_SUFFIX, REPORT_SUFFIX)
# Written only when a pass changed the float model (SmoothQuant, CLE, bias correction): the float model the
# encodings file applies to (apply-encodings needs it: the encodings name its tensors and its weights changed).
FLOAT_SUFFIX = ".prepared.onnx"


def float_model_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}{FLOAT_SUFFIX}"


def parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` -> (1, 3, 224, 224); an argparse ``type=``."""
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,3,224,224)")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be a positive integer")
    return dims


def check_name(name: str, option: str = "--name") -> str:
    """An output file stem: no folder part, nothing that would land outside the output folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name or name != name.strip():
        raise OutputError(f"{option} {name!r} is not a plain file name (it would be written outside the output "
                          "folder)", f"give {option} a name without '/' or '..' (e.g. {option} mymodel), and choose "
                          "the folder with -o/--output-dir")
    return name


def output_paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path, Path]:
    """(QDQ model, encodings, report) that ``quantize`` writes for ``name`` in ``out_dir``."""
    out_dir = Path(out_dir)
    return tuple(out_dir / f"{name}{suffix}" for suffix in OUTPUT_SUFFIXES)  # type: ignore[return-value]


def check_outputs_free(paths: tuple[Path, ...] | list[Path], inputs: list[str | os.PathLike | None],
                       option: str = "-o/--output-dir or --name") -> None:
    """Refuse to write over an input (the model, its external data) or a folder.

    An existing file at an output path that is no input is taken as an earlier run's output and replaced."""
    real_inputs = []
    for item in inputs:
        if item is None or not isinstance(item, (str, os.PathLike)):
            continue
        p = Path(item)
        if p.exists():
            real_inputs.append(p.resolve())
            if p.is_file() and p.suffix == ".onnx" and Path(f"{p}.data").exists():
                real_inputs.append(Path(f"{p}.data").resolve())
    for path in paths:
        if path.is_dir():
            raise OutputError(f"output {path} is an existing folder", f"choose another {option}")
        if not path.exists():
            continue
        target = path.resolve()
        for inp in real_inputs:
            if target == inp:
                raise OutputError(f"output {path} would overwrite the input {inp}",
                                  f"choose another {option}; the quantized model is written as <name>{QDQ_SUFFIX}")


def check_outside_data(out_dir: str | os.PathLike, data: object, option: str = "-o/--output-dir",
                       data_option: str = "--calib") -> None:
    """Refuse an output folder that is the data folder itself: the outputs would sit among the samples. (A
    subfolder is allowed: what quantize writes is never read as a sample, .onnx/.encodings/.json.)"""
    if not isinstance(data, (str, os.PathLike)) or not Path(data).is_dir():
        return
    if Path(out_dir).resolve() == Path(data).resolve():
        raise OutputError(f"{option} {out_dir} is the data folder {data_option} {data}: the outputs would be "
                          "written among the samples", f"choose another {option}, e.g. {Path(data).parent / 'quantized'}")


def check_earlier_outputs(paths: tuple[Path, ...] | list[Path], option: str = "-o/--output-dir or --name") -> None:
    """Existing files at (QDQ model, encodings, report) are replaced only when the report there says an earlier
    ``quantize`` run wrote them: a file of the same name that this tool did not make is never overwritten."""
    import json

    existing = [p for p in paths if p.is_file()]
    if not existing:
        return
    report = Path(paths[-1])
    try:
        doc = json.loads(report.read_text(encoding="utf-8"))
        ours = ("converter_version" in doc and
                {Path(v).name for v in doc.get("outputs", {}).values()} >= {Path(p).name for p in existing})
    except (OSError, ValueError, AttributeError, TypeError):
        ours = False
    if not ours:
        raise OutputError(f"{existing[0]} already exists and is not the output of an earlier quantize run "
                          f"(no {report.name} of this tool lists it)",
                          f"choose another {option}, or move the file away")


def check_output_file(path: str | os.PathLike, option: str, inputs: list[str | os.PathLike | None] = ()) -> Path:
    """Before any work: the folder of ``path`` can be written (created if missing), ``path`` is not a folder
    and not one of ``inputs``."""
    from .graph.model_io import ensure_writable_dir

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder", f"give {option} a file name, e.g. {path / 'out.json'}")
    check_outputs_free([path], list(inputs), option)
    ensure_writable_dir(path.parent if str(path.parent) else Path("."), option)
    return path


# --- command-line flags from the config fields ---------------------------------------------------------------
# Every QuantConfig / SearchConfig flag comes from its field's option(...) in converter.config (flags, help, argparse
# keywords written once); qconvert quantize groups them by config section, analyze takes a few of them.

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
    search = {f.name: getattr(args, _dest(f)) for f in dataclasses.fields(SearchConfig)
              if getattr(args, _dest(f), None) is not None} if only is None else {}
    if search:
        base = config.search if config.search is not None and not ({"metric", "evaluator"} & set(search)) else None
        overrides["search"] = base.replace(**search) if base is not None else \
            SearchConfig(**{**(config.search.to_dict() if config.search else {}), **search})
    return config.replace(**overrides) if overrides else config


