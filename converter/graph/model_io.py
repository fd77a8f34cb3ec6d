"""Loading and saving ONNX models, with errors that name the fix and atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from ..errors import ModelError, OutputError

# Protobuf cannot serialise a message of 2 GiB or more; past this size weights go to external data.
PROTOBUF_LIMIT = 2**31 - 1


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load an ONNX model from a path (external data beside it is loaded too) or copy a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    path = Path(model)
    if not path.exists():
        raise ModelError(f"model file not found: {path}", "check the path (it is relative to the current directory)")
    if path.is_dir():
        raise ModelError(f"model path is a directory, not an ONNX file: {path}", "pass the .onnx file itself")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValidationError...
        raise ModelError(
            f"cannot read {path} as an ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            "the file is corrupt or not ONNX: re-export it (qconvert export) or download it again",
        ) from None
    if not proto.graph.node:
        raise ModelError(f"{path} holds no graph nodes", "the file is not a complete ONNX model: re-export it")
    return proto


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Save atomically. Models over 2 GiB go to ``<name>.data`` beside the file (also atomically)."""
    path = Path(path)
    if model.ByteSize() < PROTOBUF_LIMIT:
        atomic_write_bytes(path, model_bytes(model))
        return
    # Large model: write into a temp folder in the destination, then move both files into place.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmpdir:
        tmp_model = Path(tmpdir) / path.name
        onnx.save_model(
            model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
            location=f"{path.name}.data", size_threshold=1024,
        )
        os.replace(Path(tmpdir) / f"{path.name}.data", path.parent / f"{path.name}.data")
        os.replace(tmp_model, path)


_created_dirs: list[Path] = []  # folders ensure_writable_dir made, so a failed run can remove them again


def ensure_writable_dir(path: str | os.PathLike, option: str = "-o/--output-dir") -> Path:
    """Create ``path`` if needed and check a file can be written there, before any long work.

    Folders created here are remembered: :func:`remove_created_dirs` takes the empty ones away after a
    failed run, so a failure leaves no empty output folder behind."""
    path = Path(path)
    missing, p = [], path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        _created_dirs.extend(reversed(missing))
        fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise OutputError(
            f"cannot write to output directory {path} ({exc.strerror or exc})",
            f"choose a directory you can write to ({option}) or fix its permissions",
        ) from None
    return path


def remove_created_dirs() -> None:
    """Remove the folders :func:`ensure_writable_dir` created that are still empty (innermost first)."""
    while _created_dirs:
        p = _created_dirs.pop()
        try:
            p.rmdir()  # only an empty folder goes
        except OSError:
            pass
