"""Option values and output locations shared by the CLI and the library.

The CLI (``converter.cli``) is the top layer: modules below it (``graph.validate``, ``verify``,
``analysis``, ``batch``) take their argument types and output checks from here, never from the CLI.
Every check here runs before any long work, so a bad output location fails in the first second.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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
