"""Loading and saving ONNX models, with errors that name the fix and atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from ..errors import ModelError, OutputError

# Protobuf cannot serialise a message of 2 GiB or more; past this size weights go to external data.
# A parameter (the CONVERTER_PROTOBUF_LIMIT environment variable, or set the module attribute) so tests
# can send a small model down the external-data path; code reads it through is_large().
PROTOBUF_LIMIT = int(os.environ.get("CONVERTER_PROTOBUF_LIMIT", 2**31 - 1))
EXTERNAL_THRESHOLD = 1024  # tensors of this many bytes or more go to the external data file
_ALIGN = 4096  # external tensors start on page boundaries (ONNX Runtime can map them)


def proto_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes; a model protobuf cannot serialise (2 GiB or more) counts as 2**31."""
    try:
        return model.ByteSize()
    except Exception:  # google.protobuf.message.EncodeError: over 2 GiB
        return 2**31


def small_bytes(model: onnx.ModelProto, deterministic: bool = False) -> bytes | None:
    """The serialized model, or None when it is large (:func:`is_large`). One serialization: ``ByteSize()``
    costs as much as ``SerializeToString()`` (0.22 s each on a 90 MB model), so size and bytes come together."""
    try:
        data = model.SerializeToString(deterministic=deterministic)
    except Exception:  # google.protobuf.message.EncodeError: over 2 GiB
        return None
    return data if len(data) < PROTOBUF_LIMIT else None


def is_large(model: onnx.ModelProto) -> bool:
    """True when ``model`` cannot (or, below a lowered :data:`PROTOBUF_LIMIT`, must not) be one protobuf."""
    return proto_size(model) >= PROTOBUF_LIMIT


def skeleton(model: onnx.ModelProto, data_location: str | None = None,
             data_file=None) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers are references into external data.

    With ``data_file`` (an open binary file) the tensors' bytes are written there (``data_location`` is
    the name the references use); without, the references point nowhere (for shape inference, which
    needs only dims and types). ``model`` is not modified and no copy of all weights is made: one
    tensor's bytes at a time."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) < EXTERNAL_THRESHOLD:
            out.graph.initializer.add().CopyFrom(t)
            continue
        ref = out.graph.initializer.add()
        ref.name, ref.data_type = t.name, t.data_type
        ref.dims.extend(t.dims)
        ref.data_location = onnx.TensorProto.EXTERNAL
        if data_file is not None:
            pos = data_file.tell()
            pad = -pos % _ALIGN
            if pad:
                data_file.write(b"\0" * pad)
                pos += pad
            raw = t.raw_data
            data_file.write(raw)
            for key, value in (("location", data_location), ("offset", str(pos)), ("length", str(len(raw)))):
                entry = ref.external_data.add()
                entry.key, entry.value = key, value
    return out


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        target = getattr(dst, field.name)
        if hasattr(value, "extend") and not isinstance(value, (str, bytes)):
            target.extend(value)
        elif hasattr(value, "CopyFrom"):
            target.CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def write_with_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``path`` and ``<path>.data`` beside it (not atomically; see :func:`save_model`)."""
    path = Path(path)
    location = f"{path.name}.data"
    with open(path.parent / location, "wb") as f:
        skel = skeleton(model, location, f)
    path.write_bytes(model_bytes(skel))


class external_copy:
    """``with external_copy(model) as path``: ``model`` written with external data to a temporary folder,
    for what needs a path rather than bytes (an ONNX Runtime session of a model over the protobuf
    limit). The folder is removed on exit."""

    def __init__(self, model: onnx.ModelProto, name: str = "model.onnx"):
        self.model, self.name = model, name

    def __enter__(self) -> str:
        self._tmp = tempfile.TemporaryDirectory(prefix="converter-large-")
        path = Path(self._tmp.name) / self.name
        write_with_external_data(self.model, path)
        return str(path)

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()


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


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> None:
    """Save atomically. Models over 2 GiB go to ``<name>.data`` beside the file (also atomically);
    ``external=True`` sends a smaller one there too (the QDQ model of a float model over the limit)."""
    path = Path(path)
    data = None if external else small_bytes(model, deterministic=True)
    if data is not None:
        atomic_write_bytes(path, data)
        return
    # Large model: write into a temp folder in the destination, then move both files into place.
    # (Not onnx.save_model(save_as_external_data=True): it moves the weights out of the caller's model.)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmpdir:
        tmp_model = Path(tmpdir) / path.name
        write_with_external_data(model, tmp_model)
        os.replace(Path(tmpdir) / f"{path.name}.data", path.parent / f"{path.name}.data")
        os.replace(tmp_model, path)


_created_dirs: list[Path] = []  # folders ensure_writable_dir made, so a failed run can remove them again


def removes_created_dirs(fn):
    """Decorator for the Python API's entry points: when ``fn`` raises, the empty folders it created go again
    (the CLI does the same for a whole command), so a data error leaves no empty output folder."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        mark = len(_created_dirs)
        try:
            return fn(*args, **kwargs)
        except BaseException:
            remove_created_dirs(mark)
            raise
    return wrapper


def ensure_writable_dir(path: str | os.PathLike, option: str = "-o/--output-dir") -> Path:
    """Create ``path`` if needed and check a file can be written there, before any long work.

    Folders created here are remembered: :func:`remove_created_dirs` takes the empty ones away after a
    failed run, so a failure leaves no empty output folder behind."""
    path = Path(path)
    missing, p = [], path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():  # -o names a file (or a folder below one): no permission would help
        where = "is" if p == path else f"would be a folder below {p}, which is"
        raise OutputError(f"{option} {path} {where} an existing file, not a folder",
                          f"give {option} a folder (it is created if missing), not a file")
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


def remove_created_dirs(keep: int = 0) -> None:
    """Remove the folders :func:`ensure_writable_dir` created that are still empty (innermost first); ``keep``:
    how many of the first remembered ones stay remembered (those of an enclosing call)."""
    while len(_created_dirs) > keep:
        p = _created_dirs.pop()
        try:
            p.rmdir()  # only an empty folder goes
        except OSError:
            pass
