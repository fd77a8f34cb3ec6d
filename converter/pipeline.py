"""The end-to-end flow: load -> preprocess -> plan -> calibrate -> encodings -> QDQ -> write.

Nothing else lives here: each stage is a function in its own module.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import __version__
from .calib.readers import model_inputs, open_calibration
from .calib.observers import ObserverSettings, resolve_methods
from .calib.runner import CalibrationResult, collect, make_session, select_providers
from .config import QuantConfig
from .errors import ConfigError, EncodingsError, ModelError, UserError
from .graph.index import GraphIndex
from .graph.model_io import (atomic_write_bytes, atomic_write_text, ensure_writable_dir, external_copy, is_large,
                             load_model, model_bytes, save_model)
from .graph.passes import default_opset, preprocess
from .graph.validate import ensure_float_model
from .options import check_earlier_outputs, check_name, check_outputs_free, output_paths
from .quant.encode import activation_tensors, compute_encodings
from .quant.encoding import Encoding
from .quant.encodings_io import FloatEncoding, dumps_encodings, read_encodings
from .quant.plan import ACTIVATION, BIAS, QuantPlan, build_plan
from .quant.qdq import quantized_node_counts, render_qdq
from .quant.rules import weight_axis

log = logging.getLogger("converter")

_QUANT_SCHEMES = {"minmax": "post_training_tf", "minmax_ema": "post_training_tf",
                  "percentile": "post_training_percentile", "mse": "post_training_tf_enhanced"}


@dataclass
class QuantResult:
    """What :func:`quantize` produced."""

    model_path: Path
    encodings_path: Path
    report_path: Path
    plan: QuantPlan
    report: dict[str, Any] = field(default_factory=dict)
    model: onnx.ModelProto | None = None


@dataclass
class Prepared:
    """A float model ready for planning: loaded, preprocessed and indexed."""

    source_path: str | None
    name: str
    original_opset: int
    model: onnx.ModelProto  # preprocessed float model
    idx: GraphIndex
    passes: dict[str, int]

    @property
    def inputs(self):
        return model_inputs(self.model)


def prepare(model: Any, name: str | None = None, example_inputs: Any = None) -> Prepared:
    """Load (or export) the model and run the preprocessing passes."""
    source_path, float_model = _resolve_model(model, example_inputs)
    name = name or (Path(source_path).stem if source_path else "model")
    proto = load_model(float_model)
    ensure_float_model(proto)
    opset = default_opset(proto)
    passes = preprocess(proto)
    log.debug("loaded %s (%d nodes, opset %d); preprocessed: %s", source_path or name, len(proto.graph.node), opset,
              ", ".join(f"{k} {v}" for k, v in passes.items() if v) or "no change")
    return Prepared(source_path, name, opset, proto, GraphIndex.build(proto), passes)


SMOOTH_SAMPLES = 32  # calibration samples SmoothQuant reads to pick its scales


def smooth(prepared: Prepared, calib_data: Any, config: QuantConfig,
           calib_spec: str | Path | None = None) -> tuple[QuantConfig, list[dict[str, Any]]]:
    """SmoothQuant the prepared model in place where it helps (:mod:`converter.quant.smoothquant`).

    Returns the config with the inserted float ``Mul`` nodes excluded, and what was changed.
    """
    if not config.smoothquant:
        return config, []
    from .quant.smoothquant import smoothquant

    data = open_calibration(calib_data, prepared.inputs, config.batch_size, SMOOTH_SAMPLES, calib_spec)
    changes = smoothquant(prepared.model, data, select_providers(config.providers), config.smoothquant_alpha,
                          activation_bits=config.activation_bits, symmetric=config.preset.activation_symmetric,
                          per_channel=config.per_channel)
    if not changes:
        return config, []
    prepared.idx = GraphIndex.build(prepared.model)
    prepared.passes["smoothquant"] = len(changes)
    return config.replace(exclude_nodes=tuple(config.exclude_nodes) + tuple(c.mul_node for c in changes)), \
        [c.to_dict() for c in changes]


def prepare_output_dir(model: Any, calib_data: Any, output_dir: str | Path, name: str | None) -> Path:
    """Check ``name`` and the output folder before any work: writable, and no output over an input."""
    if name is not None:
        check_name(name)
    out_dir = ensure_writable_dir(output_dir)
    stem = name or (Path(model).stem if isinstance(model, (str, Path)) else None)
    if stem:
        paths = output_paths(out_dir, stem)
        check_outputs_free(paths, [model, calib_data if isinstance(calib_data, (str, Path)) else None])
        check_earlier_outputs(paths)
    return out_dir


def check_node_names(model: Any, config: QuantConfig) -> None:
    """``exclude_nodes`` and ``int16_nodes`` must name nodes of the (preprocessed) model: a typo would
    otherwise quantize everything without a word."""
    wanted = [("exclude_nodes", "exclude_nodes (--exclude-nodes or --config)", n) for n in config.exclude_nodes]
    wanted += [("int16_nodes", "int16_nodes (--config)", n) for n in config.int16_nodes]
    if not wanted:
        return
    if isinstance(model, onnx.ModelProto) and model.graph.node and all(n.name for n in model.graph.node):
        proto = model
    else:
        proto = load_model(model)
        preprocess(proto)
    names = {n.name for n in proto.graph.node}
    unknown = [(key, opt, n) for key, opt, n in wanted if n not in names]
    if unknown:
        import difflib

        key, opt, _ = unknown[0]
        listed = ", ".join(repr(n) for _, _, n in unknown[:5])
        close = difflib.get_close_matches(unknown[0][2], sorted(names), n=3)
        raise ConfigError(f"{opt}: no node named {listed} in the model ({len(names)} nodes)",
                          (f"did you mean {', '.join(close)}? " if close else "")
                          + f"use node names of the model (case-sensitive), e.g. "
                          f"{', '.join(n.name for n in proto.graph.node[:3])}")
    log.debug("%d node name(s) checked: %s", len(wanted), ", ".join(n for _, _, n in wanted))


FEW_CALIB_SAMPLES = 16  # fewer calibration samples than this get a warning


def calibrate(prepared: Prepared, tensors: list[str], calib_data: Any, config: QuantConfig,
              calib_spec: str | Path | None = None):
    """One pass of the float model over the calibration data; returns the runner's CalibrationResult."""
    data = open_calibration(calib_data, prepared.inputs, config.batch_size, config.max_samples, calib_spec)
    providers = select_providers(config.providers)
    if not tensors:  # nothing to observe (all in float subgraphs / excluded): no ORT pass
        result = CalibrationResult({}, 0, 0, 0.0, providers)
        result.source = data.description
        return result
    producers = {t: n.op_type for t, n in prepared.idx.producer.items()}
    methods = resolve_methods(tensors, producers, config.calib_method, config.calib_overrides)
    log.debug("calibrating %d activation tensors on %s with %s (providers %s)", len(tensors), data.description,
              config.calib_method, ", ".join(providers))
    result = collect(prepared.model, tensors, data, methods, providers, config.threads,
                     ObserverSettings.from_config(config), config.calib_memory_budget_mb << 20)
    result.source = data.description
    if result.samples < FEW_CALIB_SAMPLES:
        log.warning("only %d calibration sample%s (%s): ranges from so few inputs rarely hold on real data; use "
                    "at least %d (100-1000 is typical) that look like what the model will see", result.samples,
                    "" if result.samples == 1 else "s", data.description, FEW_CALIB_SAMPLES)
    return result


def quantize(model: Any, calib_data: Any, config: QuantConfig | None = None, output_dir: str | Path = "out",
             name: str | None = None, example_inputs: Any = None, calib_spec: str | Path | None = None) -> QuantResult:
    """Quantize ``model`` (ONNX path, ModelProto or torch.nn.Module) with ``calib_data``.

    ``calib_data`` is a directory (``.npy``/``.npz`` or images + ``preprocess.yaml``) or a Python
    iterable / ``get_next()`` reader of ``{input name: array}`` dicts. Writes
    ``<output_dir>/<name>.qdq.onnx``, ``<name>.encodings`` and ``<name>.report.json``; never over the
    input model or the calibration data (checked before any work).
    """
    config = config or QuantConfig()
    t0 = time.perf_counter()
    out_dir = prepare_output_dir(model, calib_data, output_dir, name)
    prepared = prepare(model, name, example_inputs)
    check_node_names(prepared.model, config)
    config, smoothed = smooth(prepared, calib_data, config, calib_spec)
    plan = build_plan(prepared.model, config, prepared.idx)
    log.debug("plan: target %s, quantized tensors: %s; %d node(s) in float", config.target,
              ", ".join(f"{len(plan.by_role(r))} {r}" for r in ("activation", "weight", "bias")),
              len(plan.float_nodes()))
    for sub in plan.float_subgraphs:
        log.warning("%s node %r: subgraph %r (%d nodes) is left in float (nothing inside control flow is quantized)",
                    sub["op_type"], sub["node"], sub["subgraph"], sub["nodes"])
    timings = {"load_and_plan_s": time.perf_counter() - t0}

    calib = calibrate(prepared, activation_tensors(plan), calib_data, config, calib_spec)
    timings["calibration_s"] = calib.seconds
    t = time.perf_counter()
    compute_encodings(plan, prepared.idx, calib.observers, calib.methods, config)
    qdq = render_qdq(prepared.model, plan.encodings)
    timings["render_s"] = time.perf_counter() - t
    return finish(prepared, plan, qdq, config, calib, out_dir, timings, t0,
                  extra_report={"smoothquant": smoothed} if smoothed else None)


def finish(prepared: Prepared, plan: QuantPlan, qdq: onnx.ModelProto, config: QuantConfig, calib, out_dir: Path,
           timings: dict[str, float], t0: float, extra_report: dict[str, Any] | None = None) -> QuantResult:
    """Check the QDQ model, then write it, the encodings file and the report (each atomically)."""
    # a float model over the protobuf limit gives a QDQ model with external data too (int8 weights are a quarter
    # of the size: the QDQ model of a 2-8 GiB model would fit one protobuf, but its users expect the same layout)
    external = is_large(prepared.model)
    data = None if external or is_large(qdq) else model_bytes(qdq)  # serialized once: checked, then written
    check_model(qdq, data)
    encodings_text = encodings_json(plan, config)
    tensors = _tensor_report(plan, calib.observers, calib.methods)
    _warn_clipping(tensors)
    _note_split_groups(plan)
    name = prepared.name
    paths = output_paths(out_dir, name)
    check_outputs_free(paths, [prepared.source_path])
    check_earlier_outputs(paths)
    report = {
        "converter_version": __version__,
        "model": {"source": prepared.source_path, "name": name, "opset": prepared.original_opset,
                  "nodes": len(prepared.model.graph.node),
                  "inputs": [{"name": s.name, "dtype": s.dtype.name, "shape": list(s.shape)} for s in prepared.inputs]},
        "config": config.to_dict(),
        "preprocess": prepared.passes,
        "calibration": {"method": config.calib_method, "samples": calib.samples, "batches": calib.batches,
                        "seconds": round(calib.seconds, 3), "providers": calib.providers,
                        "source": calib.source},
        "summary": _summary(plan, qdq),
        **(extra_report or {}),
        "tensors": tensors,
        "plan": plan.to_dict(),
        "outputs": {"model": str(paths[0]), "encodings": str(paths[1]), "report": str(paths[2])},
    }
    t = time.perf_counter()
    if data is not None:
        atomic_write_bytes(paths[0], data)
    else:
        save_model(qdq, paths[0], external=external)
    atomic_write_text(paths[1], encodings_text)
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    _write_json(paths[2], report)
    log.info("wrote %s, %s, %s", *paths)
    return QuantResult(*paths, plan=plan, report=report, model=qdq)


def apply_encodings(model: Any, encodings: str | Path, output: str | Path) -> onnx.ModelProto:
    """Float model + encodings file -> the QDQ model (the same bytes ``quantize`` wrote)."""
    output = Path(output)
    ensure_writable_dir(output.parent if str(output.parent) else ".")
    float_model = load_model(model)
    preprocess(float_model)
    enc_file = read_encodings(encodings)
    encs = _encodings_for_model(float_model, enc_file, str(encodings))
    qdq = render_qdq(float_model, encs)
    check_model(qdq)
    save_model(qdq, output, external=is_large(float_model))  # the layout quantize writes
    return qdq


def encodings_json(plan: QuantPlan, config: QuantConfig) -> str:
    acts = {n: e for n, e in plan.encodings.items() if plan.tensors[n].role == ACTIVATION}
    params = {n: e for n, e in plan.encodings.items() if plan.tensors[n].role != ACTIVATION}
    args = {
        "activation_bitwidth": config.activation_bits,
        "param_bitwidth": config.weight_bits,
        "dtype": "int",
        "is_symmetric": config.preset.activation_symmetric,
        "per_channel_quantization": config.per_channel,
        "quant_scheme": _QUANT_SCHEMES.get(config.calib_method, config.calib_method),
    }
    return dumps_encodings(acts, params, args, config.encodings_version)


def check_model(model: onnx.ModelProto, data: bytes | str | None = None) -> None:
    """The output must pass the full ONNX checker and load in ONNX Runtime (``data``: the model serialized,
    or the path of a copy with external data)."""
    if data is None and is_large(model):  # over the protobuf limit: checked from a copy with external data
        with external_copy(model) as path:
            check_model(model, path)
        return
    try:
        onnx.checker.check_model(data if data is not None else model, full_check=True)
    except Exception as exc:
        raise RuntimeError(f"internal error: the QDQ model fails the ONNX checker: {exc}") from exc
    make_session(data if data is not None else model, ["CPUExecutionProvider"], optimize=False)


def _resolve_model(model: Any, example_inputs: Any) -> tuple[str | None, Any]:
    if isinstance(model, (str, Path)):
        return str(model), model
    if isinstance(model, onnx.ModelProto):
        return None, model
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise UserError("quantizing a torch.nn.Module needs example_inputs",
                            "pass example_inputs=torch.randn(1, 3, 224, 224) (the model's input shape)")
        from .export import export_torch

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"{type(model).__name__}.onnx"
            export_torch(model, example_inputs, path)
            return str(path), load_model(path)
    raise ModelError(f"cannot quantize a {type(model).__name__}",
                     "pass a path to an .onnx file, an onnx.ModelProto or a torch.nn.Module")


def _encodings_for_model(model: onnx.ModelProto, enc_file, source: str) -> dict[str, Encoding]:
    idx = GraphIndex.build(model)
    tensors = set(idx.producer) | set(idx.graph_inputs) | set(idx.initializers)
    out: dict[str, Encoding] = {}
    for section in (enc_file.activations, enc_file.params):
        for name, enc in section.items():
            if isinstance(enc, FloatEncoding):
                continue
            if name not in tensors:
                raise EncodingsError(f"{source}: tensor {name!r} is not in the model",
                                     "apply the encodings to the float model they were computed for")
            if idx.is_constant(name) and enc.per_channel and name in enc_file.axis_unknown:
                enc = dataclasses.replace(enc, axis=_param_axis(idx, name, enc, source))
            out[name] = enc
    return out


def _param_axis(idx: GraphIndex, name: str, enc: Encoding, source: str) -> int:
    if enc.bitwidth == 32:  # bias: one scale per output channel
        return 0
    shape = idx.shape.get(name, [])
    for node in idx.uses(name):
        axis = weight_axis(node, idx)
        if axis is not None and axis < len(shape) and shape[axis] == len(enc.scale):
            return axis
    raise EncodingsError(f"{source}: tensor {name!r} has {len(enc.scale)} per-channel scales, which fits no "
                         f"channel axis of its shape {shape}",
                         "apply the encodings to the float model they were computed for")


def _summary(plan: QuantPlan, qdq: onnx.ModelProto) -> dict[str, Any]:
    counts = plan.to_dict()["node_counts"]
    return {
        "nodes": counts,
        "quantized_tensors": {r: len(plan.by_role(r)) for r in ("activation", "weight", "bias")},
        "float_nodes": plan.float_nodes(),
        "float_subgraphs": plan.float_subgraphs,
        "split_scale_groups": plan.split_groups,
        "mixed_range_operands": plan.mixed_operands,
        "qdq_model_ops": quantized_node_counts(qdq),
    }


def _tensor_report(plan: QuantPlan, observers: dict, methods: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name, enc in plan.encodings.items():
        t = plan.tensors[name]
        if enc.per_channel:  # the per-channel values are in the encodings file; the report summarises them
            entry = {**t.to_dict(), "channels": len(enc.scale), "scale_min": min(enc.scale),
                     "scale_max": max(enc.scale), "zero_points": sorted(set(enc.zero_point))}
        else:
            entry = {**t.to_dict(), "scale": enc.scale[0], "zero_point": enc.zero_point[0]}
        if t.role == ACTIVATION and name in observers:
            lo, hi = observers[name].range()
            entry["observed_min"], entry["observed_max"] = lo, hi
            entry["calib_method"] = methods.get(name)
        if t.role != BIAS:
            entry["encoding_min"] = min(enc.mins())
            entry["encoding_max"] = max(enc.maxs())
        if t.role == ACTIVATION and hasattr(observers.get(name), "clipped_fraction"):
            entry["clipped_fraction"] = observers[name].clipped_fraction(entry["encoding_min"], entry["encoding_max"],
                                                                         enc.scale[0])
        out[name] = entry
    return out


def _note_split_groups(plan: QuantPlan) -> None:
    if plan.mixed_operands:
        worst = max(plan.mixed_operands, key=lambda m: m["loss_bits"])
        log.info("%d Add/Mul node(s) join operands of very different ranges (worst: %s, %r spans %.3g..%.3g in an "
                 "output range %.3g..%.3g); each operand keeps its own encoding, the output's step is the larger "
                 "one's (report: summary.mixed_range_operands)", len(plan.mixed_operands), worst["node"],
                 worst["small_operand"], *worst["small_range"], *worst["range"])
    for g in plan.split_groups:
        left = f"; {', '.join(g['float_nodes'])} left in float" if g["float_nodes"] else ""
        log.warning("scale group of %r split: %r (range %.3g..%.3g) would lose %.1f bits in the shared range "
                    "%.3g..%.3g, so the Concat inputs keep their own encodings%s", g["group"], g["worst_member"],
                    g["worst_range"][0], g["worst_range"][1], g["loss_bits"], g["range"][0], g["range"][1], left)


CLIP_WARNING = 0.01  # a histogram method clipping more than this fraction of a tensor's values is worth a look


def _warn_clipping(tensors: dict[str, dict[str, Any]]) -> None:
    clipped = sorted(((e["clipped_fraction"], n) for n, e in tensors.items()
                      if e.get("clipped_fraction", 0.0) > CLIP_WARNING), reverse=True)
    if clipped:
        worst = ", ".join(f"{n} {f:.1%} ({tensors[n]['calib_method']})" for f, n in clipped[:3])
        log.warning("%d activation(s) have more than %.0f%% of their calibration values clipped (worst: %s); if "
                    "accuracy drops, try calib_method minmax or percentile for them (calib_overrides), or run "
                    "`qconvert analyze`", len(clipped), CLIP_WARNING * 100, worst)


def _write_json(path: Path, data: dict) -> None:
    import json

    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        raise TypeError(type(o).__name__)

    atomic_write_text(path, json.dumps(data, indent=2, default=default) + "\n")
