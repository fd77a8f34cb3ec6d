"""Run the float model in ONNX Runtime and feed every planned activation to its observer.

The model is copied with a small *tap* attached to each observed tensor::

    x ─┬─ (model as before)
       ├─ ReduceMin ──▶ __calib{i}_min        exact min/max of the whole tensor, computed by ORT
       ├─ [GlobalMaxPool] ─ ReduceMax ──▶ __calib{i}_max
       └─ Reshape(-1) ─ Slice(off::step) ──▶ __calib{i}_values     histogram methods only
          or MaxPool(1x1, stride k) ─ Reshape(-1)                   (4-D tensors of static shape)

``step = max(1, Size(x) // target)`` with ``target = subsample * samples in the run`` and an offset
that changes every run, so a histogram sees about ``subsample`` values per sample and tensor, spread
over the whole tensor (``subsample = 0`` fetches every value). For NCHW tensors a 1x1 MaxPool of
stride ``k`` takes the grid ``x[:, :, ::k, ::k]`` instead, and GlobalMaxPool pre-reduces the max:
both run in ORT's blocked NCHWc layout, so no full-size reorder back to NCHW is needed for them.
Tensors produced by Relu, Clip(min >= 0), Sigmoid, ... are known non-negative: their min is not
measured (0 is reported; the encodings' range always includes 0, so they do not change).

The full activations are never graph outputs: ORT keeps reusing their buffers, and what crosses
into Python per run is two scalars (and the subsample) per tensor. Each run's outputs go to the
observers and are dropped; nothing proportional to the number of samples is kept.

Memory bound: the bytes each tap returns per sample are bounded from the shapes (subsampled
values: at most ``4 * subsample`` per sample), or measured on the first sample (a probe run,
discarded) where shapes are dynamic. If a batch would return more than ``memory_budget`` bytes, batches
are split into smaller runs; if one sample alone is over budget, the taps are split into groups
that each fit, and the data is read once per group (several passes).

Execution: CUDA EP when onnxruntime-gpu offers it, else CPU (logged either way). ORT's memory
pattern is off for the tapped model: with the taps it pre-plans one block per input shape that is
far above the real peak (EfficientNet-Lite0, batch 16: 1.15 GiB RSS against 0.70 GiB without it),
and allocating that block costs a whole extra run (0.5 s) on the second batch. Inputs and
outputs go through I/O binding: inputs as OrtValues on the EP's device, outputs bound to CPU
memory, read zero-copy as numpy arrays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from ..ops import NONNEGATIVE_OPS
from ..progress import tqdm

from ..errors import CalibrationDataError, UserError
from ..graph.clip import clip_bounds, graph_constants
from ..ort_session import create_session, custom_op_fix
from .observers import MinMaxObserver, ObserverSettings, make_observer
from .readers import CalibrationSource

log = logging.getLogger("converter")

DEFAULT_MEMORY_BUDGET = 1 << 30
_OFFSET_INPUT, _TARGET_INPUT = "__calib_offset", "__calib_target"
_OFFSET_STRIDE = 7919  # a prime: successive runs start their subsample at unrelated offsets


def make_session(model: onnx.ModelProto | bytes | str, providers: list[str], threads: int = 0,
                 optimize: bool = True, full_optimization: bool = False,
                 mem_pattern: bool = True, spinning: bool = True) -> ort.InferenceSession:
    """An ORT session; ``optimize`` gives basic graph optimizations, ``full_optimization`` all of them;
    ``spinning`` False: intra-op threads sleep between runs (sessions timed in turns)."""
    level = "all" if full_optimization else "basic" if optimize else "off"
    try:
        return create_session(model, providers, level, threads, mem_pattern, spinning)
    except Exception as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"ONNX Runtime cannot load the model: {first}", custom_op_fix(first) or
                        "check the model with `qconvert validate`; it must run in ONNX Runtime as float first") from None


@dataclass
class CalibrationResult:
    observers: dict[str, MinMaxObserver]
    samples: int
    batches: int
    seconds: float
    providers: list[str]
    passes: int = 1
    run_batch: int | None = None  # samples per ORT run when batches were split for memory
    bytes_per_sample: int = 0  # what the taps return per sample (bound from shapes, or probe estimate)
    methods: dict[str, str] = field(default_factory=dict)


# --- the augmented model ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tap:
    index: int
    tensor: str
    values: bool  # fetch the values (histogram methods), not only min/max
    nonnegative: bool = False  # produced by Relu, Clip(min >= 0), Sigmoid, ...: the min is not measured
    rank4: bool = False  # NCHW: the max goes through GlobalMaxPool, which runs in ORT's blocked layout
    grid: int = 0  # NCHW with static C, H, W: values subsampled by a 1x1 MaxPool of this stride (blocked layout too)

    @property
    def outputs(self) -> list[str]:
        base = f"__calib{self.index}_"
        return ([] if self.nonnegative else [base + "min"]) + [base + "max"] + ([base + "values"] if self.values else [])

    def split(self, values: list[np.ndarray]) -> tuple[np.ndarray | None, float, float]:
        """(values or None, min, max) from this tap's outputs."""
        if self.nonnegative:
            return (values[1] if self.values else None), 0.0, float(values[0])
        return (values[2] if self.values else None), float(values[0]), float(values[1])


def _nonnegative_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors that cannot be negative, from their producer (their encodings start at 0 anyway)."""
    consts = graph_constants(model.graph)
    out = set()
    for node in model.graph.node:
        ok = node.op_type in NONNEGATIVE_OPS
        if node.op_type == "Clip":
            bounds = clip_bounds(node, consts)
            ok = bounds is not None and bounds[0] >= 0
        if ok and node.output:
            out.add(node.output[0])
    return out


def _per_sample_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Tensor -> its dimensions after the batch dimension (0 where not static)."""
    g = model.graph
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) >= 1:
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim[1:]]
    return out


def _rank4_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """4-D tensors -> C * H * W (0 where not static)."""
    return {name: int(np.prod(dims)) for name, dims in _per_sample_dims(model).items() if len(dims) == 3}


def _sample_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Elements per sample (all dimensions after the first) of tensors whose shape is static."""
    return {name: int(np.prod(dims)) for name, dims in _per_sample_dims(model).items() if all(dims)}


def _static_bytes(tap: "_Tap", sizes: Mapping[str, int], subsample: int) -> int | None:
    """Upper bound of the bytes ``tap`` returns per sample, or None when it depends on dynamic shapes."""
    scalars = 4 * (len(tap.outputs) - int(tap.values))
    if not tap.values:
        return scalars
    if subsample:  # Slice: fewer than 2 * target values; grid: about subsample (at most ~4x) per sample
        return scalars + 16 * subsample
    size = sizes.get(tap.tensor)
    return scalars + 4 * size if size else None


def _grid_stride(size: int, subsample: int) -> int:
    """Spatial stride giving about ``subsample`` values per sample of a C*H*W = ``size`` tensor."""
    if not size or not subsample:
        return 0
    k = int(np.sqrt(size / subsample))
    return k if k >= 2 else 0  # below 2 the Slice path is as cheap and keeps the count near ``subsample``


def _constants() -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in (
        ("__calib_flat", [-1]), ("__calib_one", 1), ("__calib_vec", [1]), ("__calib_end", [2**62]),
        ("__calib_axis", [0]))]


def _tap_nodes(tap: _Tap, elem_type: int, subsample: bool) -> list[onnx.NodeProto]:
    b = f"__calib{tap.index}_"
    src, nodes = tap.tensor, []
    if elem_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [src], [b + "f32"], to=TensorProto.FLOAT, name=b + "cast"))
        src = b + "f32"
    if not tap.nonnegative:
        nodes.append(helper.make_node("ReduceMin", [src], [b + "min"], keepdims=0, name=b + "reducemin"))
    if tap.rank4:
        nodes.append(helper.make_node("GlobalMaxPool", [src], [b + "chmax"], name=b + "chmax"))
        nodes.append(helper.make_node("ReduceMax", [b + "chmax"], [b + "max"], keepdims=0, name=b + "reducemax"))
    else:
        nodes.append(helper.make_node("ReduceMax", [src], [b + "max"], keepdims=0, name=b + "reducemax"))
    if not tap.values:
        return nodes
    if not subsample:
        return nodes + [helper.make_node("Reshape", [src, "__calib_flat"], [b + "values"], name=b + "flat")]
    if tap.grid:  # x[:, :, ::k, ::k] without leaving ORT's blocked (NCHWc) layout
        return nodes + [
            helper.make_node("MaxPool", [src], [b + "grid"], kernel_shape=[1, 1], strides=[tap.grid, tap.grid],
                             name=b + "grid"),
            helper.make_node("Reshape", [b + "grid", "__calib_flat"], [b + "values"], name=b + "flat")]
    return nodes + [
        helper.make_node("Reshape", [src, "__calib_flat"], [b + "flat"], name=b + "flat"),
        helper.make_node("Size", [b + "flat"], [b + "size"], name=b + "size"),
        helper.make_node("Div", [b + "size", _TARGET_INPUT], [b + "ratio"], name=b + "ratio"),
        helper.make_node("Max", [b + "ratio", "__calib_one"], [b + "step0"], name=b + "step0"),
        helper.make_node("Mod", [_OFFSET_INPUT, b + "step0"], [b + "start0"], name=b + "start0"),
        helper.make_node("Reshape", [b + "step0", "__calib_vec"], [b + "step"], name=b + "step"),
        helper.make_node("Reshape", [b + "start0", "__calib_vec"], [b + "start"], name=b + "start"),
        helper.make_node("Slice", [b + "flat", b + "start", "__calib_end", "__calib_axis", b + "step"],
                         [b + "values"], name=b + "slice"),
    ]


def augment(model: onnx.ModelProto, taps: list[_Tap], subsample: bool) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are the taps' outputs (the original outputs are dropped)."""
    elem = elem_types(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    del g.output[:]
    uses_subsample = subsample and any(t.values and not t.grid for t in taps)
    if uses_subsample:
        g.input.extend([helper.make_tensor_value_info(n, TensorProto.INT64, []) for n in (_OFFSET_INPUT, _TARGET_INPUT)])
    g.initializer.extend(_constants())
    for tap in taps:
        g.node.extend(_tap_nodes(tap, elem.get(tap.tensor, TensorProto.FLOAT), uses_subsample))
        g.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in tap.outputs)
    return out


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


# --- running ----------------------------------------------------------------------------------------

class _TapSession:
    """One ORT session over the model augmented with ``taps``; runs a batch through I/O binding."""

    def __init__(self, model: onnx.ModelProto, taps: list[_Tap], providers: list[str], threads: int,
                 subsample: int) -> None:
        self.taps = taps
        self.subsample = subsample
        self.uses_subsample = bool(subsample) and any(t.values and not t.grid for t in taps)
        self.session = make_session(augment(model, taps, bool(subsample)), providers, threads,
                                    full_optimization=True, mem_pattern=False)
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        self.outputs = [n for t in taps for n in t.outputs]
        self.runs = 0

    def run(self, feeds: Mapping[str, np.ndarray], samples: int) -> dict[_Tap, list[np.ndarray]]:
        io = self.session.io_binding()
        for name, value in self._feeds(feeds, samples).items():
            value = np.ascontiguousarray(value)
            if self.device == "cpu":
                io.bind_cpu_input(name, value)
            else:
                io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.device, 0))
        for name in self.outputs:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        values = [v.numpy() for v in io.get_outputs()]
        self.runs += 1
        out, pos = {}, 0
        for tap in self.taps:
            k = len(tap.outputs)
            out[tap] = values[pos:pos + k]
            pos += k
        return out

    def _feeds(self, feeds: Mapping[str, np.ndarray], samples: int) -> dict[str, np.ndarray]:
        if not self.uses_subsample:
            return dict(feeds)
        return {**feeds, _OFFSET_INPUT: np.array(self.runs * _OFFSET_STRIDE, dtype=np.int64),
                _TARGET_INPUT: np.array(self.subsample * max(samples, 1), dtype=np.int64)}


def _observe(observers: Mapping[str, MinMaxObserver], outputs: Mapping[_Tap, list[np.ndarray]]) -> None:
    for tap, vals in outputs.items():
        observers[tap.tensor].update(*tap.split(vals))


def _samples_in(batch: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(batch.values())).shape[0]) if batch else 0


def _split(batch: Mapping[str, np.ndarray], size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Runs of at most ``size`` samples (along axis 0, when every input has the same batch size)."""
    n = _samples_in(batch)
    same = all(v.ndim and v.shape[0] == n for v in batch.values())
    if not same or n <= size:
        yield dict(batch), n
        return
    for i in range(0, n, size):
        part = {k: v[i:i + size] for k, v in batch.items()}
        yield part, _samples_in(part)


@dataclass
class _Schedule:
    groups: list[list[_Tap]]
    run_batch: int | None  # None: whole batches
    bytes_per_sample: int


def schedule(taps: list[_Tap], per_sample: Mapping[str, int], budget: int, batch: int) -> _Schedule:
    """Split taps into groups whose outputs for one sample fit ``budget``; size runs to fit it too."""
    total = sum(per_sample[t.tensor] for t in taps)
    if total * max(batch, 1) <= budget:
        return _Schedule([taps], None, total)
    if total <= budget:
        return _Schedule([taps], max(1, budget // max(total, 1)), total)
    groups: list[list[_Tap]] = [[]]
    size = 0
    for tap in taps:
        b = per_sample[tap.tensor]
        if groups[-1] and size + b > budget:
            groups.append([])
            size = 0
        groups[-1].append(tap)
        size += b
    biggest = max(sum(per_sample[t.tensor] for t in g) for g in groups)
    return _Schedule(groups, max(1, budget // max(biggest, 1)), total)


def _reiterable(data: Any) -> bool:
    if isinstance(data, CalibrationSource):
        return data.kind != "python" or isinstance(data.items, (Sequence, dict))
    return isinstance(data, Sequence)


def collect(model: onnx.ModelProto, tensors: list[str], data: Iterable[dict[str, np.ndarray]],
            method: str | Mapping[str, str], providers: list[str], threads: int = 0,
            settings: ObserverSettings | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> CalibrationResult:
    """Calibrate: an observer per tensor in ``tensors``, updated run by run over ``data``.

    ``method`` is one method for every tensor, or a mapping tensor -> method (missing: minmax).
    """
    settings = settings or ObserverSettings()
    methods = {t: (method.get(t, "minmax") if isinstance(method, Mapping) else method) for t in tensors}
    observers = {t: make_observer(methods[t], settings) for t in tensors}
    nonneg, rank4 = _nonnegative_tensors(model), _rank4_tensors(model)
    taps = [_Tap(i, t, observers[t].needs_values, t in nonneg, t in rank4,
                 _grid_stride(rank4.get(t, 0), settings.subsample) if observers[t].needs_values else 0)
            for i, t in enumerate(tensors)]
    start = time.perf_counter()
    total = getattr(data, "num_samples", None)
    if total is not None and getattr(data, "max_samples", None) is not None:
        total = min(total, data.max_samples)
    it = iter(data)
    first = next(it, None)
    if first is None:
        raise CalibrationDataError("no calibration samples", "add at least one sample (more than 100 is typical)")
    session = _TapSession(model, taps, providers, threads, settings.subsample)
    sizes = _sample_sizes(model)
    per_sample = {t.tensor: _static_bytes(t, sizes, settings.subsample) for t in taps}
    if any(b is None for b in per_sample.values()):
        probe = next(_split(first, 1))[0]
        per_sample = {t.tensor: sum(int(v.nbytes) for v in vals) for t, vals in _run(session, probe, 0).items()}
    plan = schedule(taps, per_sample, memory_budget, _samples_in(first))
    if len(plan.groups) > 1 or plan.run_batch is not None:
        log.info("calibration outputs are %.1f MiB per sample: %d pass(es), runs of %s sample(s) to stay within "
                 "%.0f MiB", plan.bytes_per_sample / 2**20, len(plan.groups), plan.run_batch or "all",
                 memory_budget / 2**20)
    samples = batches = 0
    with tqdm(total=total * len(plan.groups) if total else None, desc="calibrating", unit="sample",
              disable=None, leave=False) as bar:
        if len(plan.groups) == 1:
            for batch in _chain(first, it):
                samples += _one_batch(session, observers, batch, plan.run_batch, batches, bar)
                batches += 1
        else:
            if not _reiterable(data):
                raise CalibrationDataError(
                    f"the observed activations need {plan.bytes_per_sample / 2**20:.0f} MiB per sample, over the "
                    f"calibration memory budget of {memory_budget / 2**20:.0f} MiB, and the data can be read only once",
                    "pass the calibration data as a list or a directory (it is then read once per group of "
                    "tensors), or raise calib_memory_budget_mb")
            del session, first, it
            for gi, group in enumerate(plan.groups):
                session = _TapSession(model, group, providers, threads, settings.subsample)
                for bi, batch in enumerate(data):
                    n = _one_batch(session, observers, batch, plan.run_batch, bi, bar)
                    if gi == 0:
                        samples, batches = samples + n, batches + 1
                del session
    seconds = time.perf_counter() - start
    log.info("calibrated %d tensors on %d samples in %.2f s (%.1f samples/s)", len(tensors), samples, seconds,
             samples / seconds if seconds else 0.0)
    return CalibrationResult(observers, samples, batches, seconds, providers, len(plan.groups), plan.run_batch,
                             plan.bytes_per_sample, methods)


def _chain(first: dict[str, np.ndarray], rest: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    yield first
    yield from rest


def _run(session: _TapSession, feeds: Mapping[str, np.ndarray], batch_index: int) -> dict[_Tap, list[np.ndarray]]:
    try:
        return session.run(feeds, _samples_in(feeds))
    except Exception as exc:
        raise CalibrationDataError(f"ONNX Runtime failed on calibration batch {batch_index}: "
                                   f"{str(exc).splitlines()[0]}",
                                   "check that the data matches the model's input shapes") from None


def _one_batch(session: _TapSession, observers: Mapping[str, MinMaxObserver], batch: Mapping[str, np.ndarray],
               run_batch: int | None, index: int, bar: tqdm) -> int:
    n = _samples_in(batch)
    for part, _ in _split(batch, run_batch or max(n, 1)):
        _observe(observers, _run(session, part, index))
    for tap in session.taps:
        observers[tap.tensor].end_batch()
    bar.update(n)
    return n


def capture(model: onnx.ModelProto, tensors: list[str], batches: Iterable[dict[str, np.ndarray]],
            providers: list[str]) -> list[dict[str, np.ndarray]]:
    """Run ``model`` on ``batches`` and keep ``tensors`` (plus the inputs) for each batch (all values: for a few
    samples, e.g. the search's sensitivity or SmoothQuant's scales; calibration itself streams)."""
    return list(iter_capture(model, tensors, batches, providers))


def iter_capture(model: onnx.ModelProto, tensors: list[str], batches: Iterable[dict[str, np.ndarray]],
                 providers: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """:func:`capture` one batch at a time (for callers that reduce each batch, e.g. to per-channel means)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    have = {o.name for o in augmented.graph.output}
    inputs = {i.name for i in augmented.graph.input}
    fetch = [t for t in dict.fromkeys(tensors) if t not in inputs]
    types = elem_types(model)
    for t in fetch:
        if t not in have:  # a layer may read integer tensors too (a Shape output in a pattern block)
            augmented.graph.output.append(helper.make_tensor_value_info(t, types[t], None) if types.get(t)
                                          else helper.make_empty_tensor_value_info(t))  # ORT infers the type
    session = make_session(augmented, providers)
    for batch in batches:
        values = dict(zip(fetch, session.run(fetch, batch)))
        values.update(batch)
        yield values
