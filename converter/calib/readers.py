"""Calibration data readers.

Sources a user can give:

* a directory of ``.npy`` files (single-input models) or ``.npz`` files (keys = input names), each
  one sample (no batch axis) or a batch along axis 0; a ``.npz`` key that is no model input (a stored
  label) is skipped with a warning naming it;
* a directory of images with a ``preprocess.yaml`` spec (or a spec passed explicitly), see
  :class:`ImageSpec`; images in class subfolders (torchvision's ImageFolder layout) count too;
* from Python: any iterable of ``{input name: array}`` dicts, or an object with ``get_next()``
  returning such dicts and then ``None`` (ONNX Runtime's ``CalibrationDataReader`` protocol); for a
  single-input model also a plain array (a batch along axis 0) or an iterable of arrays.

Folders are read recursively, files in sorted order of their path below the folder (deterministic).
Floating data of another precision than the model input (numpy's default float64) is cast to the
input's dtype, and integer data to the input's integer dtype (logged at debug level).

Batch size bound: a batch is one ONNX Runtime run, whose activations grow with it. Where the model's
shapes are known, a requested batch above :data:`DEFAULT_BATCH` is capped so that the per-sample sizes of
every tensor of the model, times the batch, stay within :data:`BATCH_MEMORY_BUDGET` (an upper bound of what
ONNX Runtime holds for a run); the cap never goes below :data:`DEFAULT_BATCH` and is logged as a warning.

Every sample is checked against the model's inputs (names, dtype, shape, finite values) and the
error names the file, the input and the fix. Samples are re-batched to ``batch_size`` where the
model's batch dimension is dynamic. Nothing is kept beyond the batch being assembled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx

from ..config import load_mapping
from ..errors import CalibrationDataError, ConfigError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPEC_NAMES = ("preprocess.yaml", "preprocess.yml", "preprocess.json")
DEFAULT_BATCH = 16  # QuantConfig.batch_size's default: never capped below this
BATCH_MEMORY_BUDGET = 1 << 30  # bytes of model tensors one run may hold (see the module docstring)

log = logging.getLogger("converter")
_WARNED_EXTRA_KEYS: set[tuple[str, str]] = set()  # (folder, .npz key) already warned about


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]  # None for a dynamic dimension

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and self.shape[0] is None


class ModelInputs(list):
    """The model's :class:`InputSpec` list, holding the model for :func:`bounded_batch_size`."""

    def __init__(self, specs: Iterable[InputSpec], model: onnx.ModelProto | None = None):
        super().__init__(specs)
        self.model = model


def one_sample(batch: dict, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """One sample of a batch (the batch-1 latency runs): an input with a dynamic first dimension sliced to one item,
    the others as they are (a recurrent state whose batch axis is not the first, a scalar such as a sample rate)."""
    dynamic = {s.name for s in specs if s.dynamic_batch}
    return {k: np.asarray(v)[:1] if k in dynamic and np.ndim(v) else np.asarray(v) for k, v in batch.items()}


def batch_length(batch: dict, specs: list[InputSpec]) -> int:
    """How many samples ``batch`` holds: the first axis of an input whose first dimension is dynamic (1 if none)."""
    dynamic = [k for k in (s.name for s in specs if s.dynamic_batch) if k in batch and np.ndim(batch[k])]
    return int(np.shape(batch[dynamic[0]])[0]) if dynamic else 1


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return ModelInputs(specs, model)


def sample_bytes(model: onnx.ModelProto) -> int | None:
    """Bytes per sample of every tensor of ``model`` whose shape (less the batch axis) shape inference knows:
    an upper bound of the activations ONNX Runtime holds per sample of a run. None where inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # a model over 2 GB, an unknown domain: no bound, the batch stays as asked
        log.debug("batch size bound skipped: shape inference failed (%s)", exc)
        return None
    total = 0
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim][1:]
        if not tt.elem_type or not all(d > 0 for d in dims):
            continue
        total += int(np.prod(dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
    return total or None


_SAMPLE_BYTES: dict[tuple, int | None] = {}  # the last model's sample_bytes
_WARNED: set[tuple] = set()  # (model key, batch size, cap) already warned about


def bounded_batch_size(inputs: list[InputSpec], batch_size: int, budget: int | None = None) -> int:
    """``batch_size``, capped where its run would hold more than ``budget`` bytes (default
    :data:`BATCH_MEMORY_BUDGET`) of model tensors, never below :data:`DEFAULT_BATCH`: the module docstring's rule."""
    budget = BATCH_MEMORY_BUDGET if budget is None else budget
    model = getattr(inputs, "model", None)
    if batch_size <= DEFAULT_BATCH or model is None:
        return batch_size
    key = (id(model), len(model.graph.node), len(model.graph.value_info))
    if key not in _SAMPLE_BYTES:  # one shape inference per model: a run opens its data several times
        _SAMPLE_BYTES.clear()
        _SAMPLE_BYTES[key] = sample_bytes(model)
    per_sample = _SAMPLE_BYTES[key]
    if not per_sample or per_sample * batch_size <= budget:
        return batch_size
    cap = max(DEFAULT_BATCH, budget // per_sample)
    if cap < batch_size and (key, batch_size, cap) not in _WARNED:
        _WARNED.add((key, batch_size, cap))
        log.warning("batch size %d capped to %d: the model's tensors take up to %.1f MiB per sample, and one ONNX "
                    "Runtime run of %d samples could hold %.1f GiB (bound: %.0f MiB per run)", batch_size, cap,
                    per_sample / 2**20, batch_size, per_sample * batch_size / 2**30, budget / 2**20)
    return min(cap, batch_size)


# --- image preprocessing --------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageSpec:
    """``x = (pixel * scale - mean) / std`` with pixels in 0..255 after resize and crop."""

    resize: int | tuple[int, int] | None = None  # shorter side, or exact (H, W)
    center_crop: int | tuple[int, int] | None = None
    color: str = "RGB"
    layout: str = "NCHW"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    dtype: str = "float32"
    input: str | None = None

    @classmethod
    def load(cls, path: Path) -> "ImageSpec":
        data, lines = load_mapping(path, "image preprocessing spec", "--image-spec (or preprocess.yaml in the data folder)")
        known = set(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                where = f"{path}" + (f", line {lines[key]}" if key in lines else "")
                raise ConfigError(f"unknown preprocessing key {key!r} in {where}",
                                  f"use only: {', '.join(sorted(known))}")
        for key in ("resize", "center_crop"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(float(v) for v in (data[key] if isinstance(data[key], list) else [data[key]] * 3))
        spec = cls(**data)
        if spec.color not in ("RGB", "BGR") or spec.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"{path}: color must be RGB or BGR and layout NCHW or NHWC",
                              "fix the color/layout keys")
        if any(s == 0 for s in spec.std):
            raise ConfigError(f"{path}: std must not contain 0", "use the per-channel standard deviations")
        return spec

    def apply(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if self.resize is not None:
                    if isinstance(self.resize, int):
                        w, h = im.size
                        k = self.resize / min(w, h)
                        size = (max(1, round(w * k)), max(1, round(h * k)))
                    else:
                        size = (self.resize[1], self.resize[0])
                    im = im.resize(size, Image.BILINEAR)
                if self.center_crop is not None:
                    ch, cw = (self.center_crop, self.center_crop) if isinstance(self.center_crop, int) else self.center_crop
                    w, h = im.size
                    if ch > h or cw > w:
                        raise CalibrationDataError(f"{path}: image {w}x{h} is smaller than center_crop {cw}x{ch}",
                                                   "set resize so the image is at least the crop size")
                    left, top = (w - cw) // 2, (h - ch) // 2
                    im = im.crop((left, top, left + cw, top + ch))
                x = np.asarray(im, dtype=np.float32)
        except (OSError, ValueError) as exc:
            raise CalibrationDataError(f"cannot read image {path}: {exc}", "remove or replace the file") from None
        if self.color == "BGR":
            x = x[..., ::-1]
        x = (x * self.scale - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x, dtype=self.dtype)


# --- sources -------------------------------------------------------------------------------------

@dataclass
class CalibrationSource:
    """Validated, re-batched calibration samples for one model."""

    inputs: list[InputSpec]
    items: Any  # list of paths, or a Python iterable/reader
    kind: str  # "arrays" | "images" | "python"
    batch_size: int = 16
    max_samples: int | None = None
    image_spec: ImageSpec | None = None
    description: str = ""
    num_samples: int | None = field(default=None)
    _cast_logged: set = field(default_factory=set, repr=False)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Yield batches ``{input name: array}`` of at most ``batch_size`` samples."""
        batchable = all(s.dynamic_batch for s in self.inputs)
        target = bounded_batch_size(self.inputs, self.batch_size) if batchable else 1
        pending: list[dict[str, np.ndarray]] = []
        seen = 0
        for origin, sample in self._samples():
            batch = self._check(origin, sample, batchable)
            if not batchable:  # a scalar or a state whose batch axis is not 0 (RNN [2, N, 128]): one file, one sample
                if self.max_samples is not None and seen >= self.max_samples:
                    break
                seen += 1
                yield batch
                continue
            n = next(iter(batch.values())).shape[0]
            if pending and _shapes(pending[0]) != _shapes(batch):  # different sizes (text lines): a new batch
                yield _stack(pending)
                pending = []
            for i in range(n):
                if self.max_samples is not None and seen >= self.max_samples:
                    break
                pending.append({k: v[i:i + 1] for k, v in batch.items()})
                seen += 1
                if len(pending) == target:
                    yield _stack(pending)
                    pending = []
            if self.max_samples is not None and seen >= self.max_samples:
                break
        if pending:
            yield _stack(pending)
        if seen == 0:
            raise CalibrationDataError(f"no calibration samples in {self.description}",
                                       "add at least one sample (more than 100 is typical)")

    def _samples(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        if self.kind == "images":
            name = self.image_spec.input or self.inputs[0].name
            for p in self.items:
                yield str(p), {name: self.image_spec.apply(p)}
        elif self.kind == "arrays":
            names = {s.name for s in self.inputs}
            for p in self.items:
                sample = _load_array_file(p, self.inputs)
                extra = sorted(k for k in sample if k not in names)
                if extra and p.suffix == ".npz" and len(extra) < len(sample):  # a stored label beside the inputs
                    # once per folder and key in a process: a run reads its data several times (calibration, the
                    # techniques, the quality check)
                    new = [k for k in extra if (str(p.parent), k) not in _WARNED_EXTRA_KEYS]
                    if new:
                        _WARNED_EXTRA_KEYS.update((str(p.parent), k) for k in new)
                        log.warning("%s: key%s %s %s no input of the model: ignored (model inputs: %s)", p,
                                    "" if len(new) == 1 else "s", ", ".join(repr(k) for k in new),
                                    "is" if len(new) == 1 else "are", ", ".join(sorted(names)))
                    sample = {k: v for k, v in sample.items() if k in names}
                yield str(p), sample
        else:
            single = self.inputs[0].name if len(self.inputs) == 1 else None
            for i, sample in enumerate(_iterate_python(self.items)):
                if single is not None and not isinstance(sample, dict) and _array_like(sample):
                    sample = {single: sample}  # a single-input model: a plain array is that input
                if not isinstance(sample, dict):
                    raise CalibrationDataError(
                        f"calibration sample {i} is a {type(sample).__name__}, not a dict of input name -> array",
                        "yield {input_name: numpy_array} dicts" + (
                            "" if single else " (a plain array is enough only for a single-input model)"))
                yield f"sample {i}", sample

    def _check(self, origin: str, sample: dict[str, Any], batchable: bool = True) -> dict[str, np.ndarray]:
        names = [s.name for s in self.inputs]
        missing = [n for n in names if n not in sample]
        extra = [k for k in sample if k not in names]
        if missing or extra:
            raise CalibrationDataError(
                f"{origin}: calibration data has inputs {sorted(sample)} but the model expects {names}",
                "name the arrays after the model inputs (npz keys), or pass one .npy per sample for a "
                "single-input model")
        out = {}
        n_batch = None
        for spec in self.inputs:
            x = np.asarray(sample[spec.name])
            if x.dtype != spec.dtype and _castable(x.dtype, spec.dtype):
                if (spec.name, x.dtype) not in self._cast_logged:
                    self._cast_logged.add((spec.name, x.dtype))
                    log.debug("%s: input %r is %s, cast to the model's %s", origin, spec.name, x.dtype, spec.dtype)
                x = x.astype(spec.dtype)
            if x.dtype != spec.dtype:
                raise CalibrationDataError(
                    f"{origin}: input {spec.name!r} has dtype {x.dtype}, the model expects {spec.dtype}",
                    f"convert the data with .astype(np.{spec.dtype.name}) before saving")
            if spec.shape and x.ndim == len(spec.shape) - 1:
                x = x[None]
            if spec.shape and x.ndim != len(spec.shape):
                raise CalibrationDataError(
                    f"{origin}: input {spec.name!r} has shape {list(x.shape)}, the model expects "
                    f"{_fmt_shape(spec.shape)} (one sample without the batch axis, or a batch along axis 0)",
                    "reshape the data to the model input's shape")
            for axis, (got, want) in enumerate(zip(x.shape, spec.shape)):
                if axis > 0 and want is not None and got != want:
                    raise CalibrationDataError(
                        f"{origin}: input {spec.name!r} has shape {list(x.shape)}, the model expects "
                        f"{_fmt_shape(spec.shape)} (axis {axis}: {got} != {want})",
                        "resize/reshape the data to the model input's shape")
            if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
                bad = int((~np.isfinite(x)).sum())
                raise CalibrationDataError(f"{origin}: input {spec.name!r} contains {bad} NaN/Inf values",
                                           "clean or drop those samples: calibration ranges would be meaningless")
            if batchable and n_batch is not None and x.shape[0] != n_batch:
                raise CalibrationDataError(f"{origin}: inputs have different batch sizes",
                                           "give every input the same number of samples")
            n_batch = x.shape[0] if x.ndim else None
            out[spec.name] = x
        return out


def check_calibration_path(source: Any) -> None:
    """A calibration path (a folder or a file) that does not exist: the one error for it, wherever it is found."""
    if isinstance(source, (str, Path)) and not Path(source).exists():
        raise CalibrationDataError(f"calibration data not found: {source}",
                                   "pass a directory of .npy/.npz files or images")


def open_calibration(source: Any, inputs: list[InputSpec], batch_size: int = 16, max_samples: int | None = None,
                     image_spec: str | Path | None = None) -> CalibrationSource:
    """Turn what the user gave into a :class:`CalibrationSource` (checked lazily, sample by sample)."""
    common = dict(inputs=inputs, batch_size=batch_size, max_samples=max_samples)
    if isinstance(source, CalibrationSource):
        return source
    if _array_like(source) and not isinstance(source, (str, Path)):
        if len(inputs) != 1:
            raise CalibrationDataError(
                f"calibration data is one array but the model has {len(inputs)} inputs "
                f"({', '.join(s.name for s in inputs)})",
                "pass {input_name: array} dicts (or a list of them), one key per model input")
        source = [{inputs[0].name: source}]
    if not isinstance(source, (str, Path)):
        if isinstance(source, dict):
            source = [source]
        return CalibrationSource(items=source, kind="python", description="the Python calibration data", **common)
    path = Path(source)
    check_calibration_path(path)
    files = _data_files(path) if path.is_dir() else [path]
    arrays = [p for p in files if p.suffix in (".npy", ".npz")]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if arrays:
        counts = [_npy_len(p, inputs) for p in arrays]
        n = None if -1 in counts else sum(counts)
        return CalibrationSource(items=arrays, kind="arrays", description=str(path), num_samples=n, **common)
    if images:
        spec_path = Path(image_spec) if image_spec else next((path / s for s in SPEC_NAMES if (path / s).is_file()), None)
        if spec_path is None:
            raise CalibrationDataError(
                f"{path} holds images but no preprocessing spec (preprocess.yaml)",
                "add preprocess.yaml (resize, center_crop, color, layout, scale, mean, std) to the folder "
                "or pass --image-spec FILE (Python: image_spec=)")
        if len(inputs) != 1 and ImageSpec.load(spec_path).input is None:
            raise CalibrationDataError("the model has several inputs; image calibration needs 'input:' in the spec",
                                       "add 'input: NAME' to the preprocessing spec")
        return CalibrationSource(items=images, kind="images", image_spec=ImageSpec.load(spec_path),
                                 description=str(path), num_samples=len(images), **common)
    raise CalibrationDataError(f"no calibration samples in {path} (no .npy, .npz or image files)",
                               "put .npy/.npz files or images (with preprocess.yaml) in the directory")


def _data_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` (class subfolders, torchvision's ImageFolder layout, included), sorted by its
    path relative to ``folder``; hidden files and folders (``.git``, ``.DS_Store``) are skipped."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        found.append((rel.as_posix(), p))
    return [p for _, p in sorted(found)]


def _array_like(x: Any) -> bool:
    return isinstance(x, np.ndarray) or (hasattr(x, "__array__") and not isinstance(x, (dict, str, bytes)))


def _castable(got: np.dtype, want: np.dtype) -> bool:
    """float64 -> float32/float16 and int64 -> int32 & co.: the same kind of number, another precision."""
    return ((np.issubdtype(got, np.floating) and np.issubdtype(want, np.floating))
            or (np.issubdtype(got, np.signedinteger) and np.issubdtype(want, np.signedinteger))
            or (np.issubdtype(got, np.unsignedinteger) and np.issubdtype(want, np.unsignedinteger)))


def _npy_len(p: Path, inputs: list[InputSpec]) -> int:
    """Samples in one .npy/.npz file from its array header (no data read): a batch along axis 0, or one sample;
    -1 where it cannot be told (the count is then unknown)."""
    if not inputs:
        return -1
    try:
        if p.suffix == ".npz":
            import zipfile

            with zipfile.ZipFile(p) as z, z.open(f"{inputs[0].name}.npy") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape = read_header(f)[0]
        else:
            shape = np.load(p, mmap_mode="r").shape
    except Exception:
        return -1 if p.suffix == ".npz" else 0
    return shape[0] if inputs[0].shape and len(shape) == len(inputs[0].shape) else 1


def check_label_count(source: "CalibrationSource", labels: Any, max_samples: int | None = None) -> None:
    """Before any model runs: the labels must number the samples that will be read (the first ``max_samples``
    when given; at least that many then)."""
    if labels is None or source.num_samples is None:
        return
    n = len(labels)
    want = source.num_samples if max_samples is None else min(source.num_samples, max_samples)
    if n != want and not (max_samples is not None and n >= want):
        raise CalibrationDataError(f"{n} labels for the {want} samples"
                                   f"{'' if max_samples is None else ' used'} in {source.description}",
                                   "give exactly one label per sample, in the data's sorted file order")


def load_labels(labels: Any) -> np.ndarray | None:
    """Integer class labels, one per sample in the data's sorted file order (verify, analyze and the search read
    them here): a ``.npy`` file, a text file of integers (one per line, or separated by any whitespace) or a
    sequence / array. A ``[N, 1]`` array is taken as ``[N]``; floating values must be whole numbers. None -> None."""
    if labels is None:
        return None
    if not isinstance(labels, (str, Path)):
        arr, source = np.asarray(labels), "the labels array"
    else:
        path = Path(labels)
        source = str(path)
        if not path.is_file():
            raise CalibrationDataError(f"labels file not found: {path}",
                                       "pass a .npy file of integers or a text file with one integer per line")
        if path.suffix == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except Exception as exc:
                raise CalibrationDataError(f"cannot read labels {path}: {exc}", "re-save it with numpy.save") from None
        else:
            try:
                arr = np.array([int(t) for t in path.read_text(encoding="utf-8").split()], dtype=np.int64)
            except (ValueError, UnicodeDecodeError) as exc:
                raise CalibrationDataError(f"{path}: every line must be an integer class index ({exc})",
                                           "write one class index per line, in the data's sorted file order") from None
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr.reshape(-1)
    whole = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and bool(np.all(np.isfinite(arr))) and bool(np.all(arr == np.round(arr))))
    if arr.ndim != 1 or not whole:
        raise CalibrationDataError(f"{source}: labels must be a 1-D array of integers, got {arr.dtype} "
                                   f"of shape {list(arr.shape)}", "save one integer class index per sample")
    return arr.astype(np.int64)


def _load_array_file(p: Path, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise CalibrationDataError(f"cannot read {p}: {type(exc).__name__}: {exc}",
                                   "re-save it with numpy.save / numpy.savez") from None
    if len(inputs) != 1:
        raise CalibrationDataError(
            f"{p}: a .npy file holds one array but the model has {len(inputs)} inputs "
            f"({', '.join(s.name for s in inputs)})",
            "save .npz files with one key per model input (numpy.savez(path, **{name: array}))")
    return {inputs[0].name: arr}


def _iterate_python(items: Any) -> Iterable[Any]:
    if hasattr(items, "get_next"):
        while (x := items.get_next()) is not None:
            yield x
    else:
        yield from items


def _shapes(batch: dict[str, np.ndarray]) -> tuple:
    """The per-sample shapes of a batch (what must agree for samples to stack)."""
    return tuple((k, v.shape[1:]) for k, v in batch.items())


def _stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


# --- one reader, several passes ----------------------------------------------------------------------

class Replayable:
    """A one-shot reader (``get_next()`` or an iterator) that several passes can read.

    The first ``keep`` items are kept; each pass reads them again, then goes on with the source where the
    previous pass left it. The passes before calibration (CLE, SmoothQuant) read a few samples, calibration
    reads everything once (kept items, then the rest streamed, never stored), the passes after it (bias
    correction, the search's ranking) read the kept ones again: memory stays bounded by ``keep`` items.
    """

    def __init__(self, source: Any, keep: int) -> None:
        self._source = iter(source.get_next, None) if hasattr(source, "get_next") else iter(source)
        self.keep = keep
        self.head: list[Any] = []
        self.streamed = False  # items past the kept ones were handed out (a second full pass gets only the kept)

    def __iter__(self):
        after_full_pass = self.streamed  # a pass after one that streamed past the kept items: the kept ones only
        i = 0
        while True:
            if i < len(self.head):
                yield self.head[i]
                i += 1
                continue
            if after_full_pass:
                return
            item = next(self._source, None)
            if item is None:
                return
            if len(self.head) < self.keep:
                self.head.append(item)
                i += 1
            else:
                self.streamed = True
            yield item


def replayable(calib_data: Any, keep: int = 64) -> Any:
    """``calib_data`` as :class:`Replayable` when it is a one-shot reader and more than one pass reads it
    (CLE, bias correction, SmoothQuant, the search): otherwise the first pass would consume samples the
    calibration never sees. Folders, lists and dicts are returned as they are."""
    if isinstance(calib_data, (str, Path, dict, list, tuple, Replayable)):
        return calib_data
    if hasattr(calib_data, "get_next") or hasattr(calib_data, "__next__"):
        return Replayable(calib_data, keep)
    return calib_data
