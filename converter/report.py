"""The quantize report: what ``finish`` writes to ``<name>.report.json``.

:func:`build_report` assembles it from the flow's state (model, config, preprocessing, calibration, summary,
encodings-file notes, the techniques' entries, per-tensor encodings, plan, outputs); :func:`measure_quality`
adds the ``quality`` block (the QDQ model against FP32 on calibration samples, :mod:`converter.metrics`),
:func:`ort_cpu_kernels` / :func:`runtime_accounting` the ``summary.ort_cpu_kernels`` block, :func:`write_json`
writes it. Nothing here changes the model or the encodings.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from ._version import __version__
from .calib.readers import batch_length, one_sample, open_calibration
from .calib.runner import make_session
from .config import QuantConfig
from .graph.index import GraphIndex
from .graph.macs import node_macs
from .graph.model_io import atomic_write_text, is_large, load_model
from .metrics import OutputStats
from .ort_session import kernel_summary, optimized_op_counts, runtime_layers
from .quant.control_flow import quantized_nodes_in_bodies, subgraph_qdq_counts
from .quant.plan import ACTIVATION, BIAS, WEIGHT, QuantPlan
from .quant.qdq import quantized_node_counts
from .timing import paired_latency

if TYPE_CHECKING:
    from .techniques.state import FlowState

log = logging.getLogger("converter")


def build_report(prepared: FlowState, plan: QuantPlan, qdq: onnx.ModelProto, config: QuantConfig, calib,
                 kernels: dict[str, Any] | None, encodings_file: dict[str, Any], tensors: dict[str, Any],
                 extra_report: dict[str, Any] | None, paths: tuple[Path, Path, Path],
                 float_path: Path | None) -> dict[str, Any]:
    """The report's sections, in the order they are written (``quality``, ``binding`` and ``timings`` are added
    by ``finish`` after the measurement and the writes)."""
    return {
        "converter_version": __version__,
        "model": {"source": prepared.source_path, "name": prepared.name, "opset": prepared.original_opset,
                  "nodes": len(prepared.model.graph.node),
                  "inputs": [{"name": s.name, "dtype": s.dtype.name, "shape": list(s.shape)} for s in prepared.inputs]},
        "config": config.to_dict(),
        # how weights below 8 bits (not block-wise) are written in the QDQ model; apply-encodings renders alike
        "weight_storage": "int8" if config.low_bit_weights_as_int8 else "packed",
        "preprocess": prepared.passes,
        "calibration": {"method": config.calib_method, "samples": calib.samples, "batches": calib.batches,
                        "seconds": round(calib.seconds, 3), "providers": calib.providers,
                        "source": calib.source},
        "summary": {**summary(plan, qdq), **({"ort_cpu_kernels": kernels} if kernels else {})},
        "encodings_file": encodings_file,
        **(extra_report or {}),
        "tensors": tensors,
        "plan": plan.to_dict(),
        "outputs": {"model": str(paths[0]), "encodings": str(paths[1]), "report": str(paths[2]),
                    **({"float_model": str(float_path)} if float_path else {})},
    }


QUALITY_SAMPLES = 32  # calibration samples quantize compares the QDQ model with FP32 on (output cosine, SQNR)


def measure_quality(prepared: FlowState, qdq: onnx.ModelProto | bytes, calib_data: Any, config: QuantConfig,
                    calib_spec: str | Path | None = None) -> dict[str, Any] | None:
    """What a plain quantize says about the model it wrote: per output, the mean per-sample cosine and the SQNR
    of the QDQ model against FP32 on the first :data:`QUALITY_SAMPLES` calibration samples
    (:class:`converter.metrics.OutputStats`, as in ``verify``'s table), and the batch-1 latency of both on ONNX Runtime CPU, all optimizations, interleaved
    (:func:`converter.timing.paired_latency`: medians and p10-p90). FP32 is the float model as given (its file),
    else the prepared one. None, with a warning, when either model cannot run (the files are still written)."""
    t = time.perf_counter()
    try:
        source = prepared.source_path
        as_given = bool(source and Path(source).is_file() and not is_large(prepared.model))
        reference = load_model(source) if as_given else prepared.model
        providers = ["CPUExecutionProvider"]
        # timed in turns: without spinning, neither session's idle threads take the cores of the other's run
        ref = make_session(reference, providers, config.threads, full_optimization=True, spinning=False)
        got = make_session(qdq, providers, config.threads, full_optimization=True, spinning=False)
        outputs = [o.name for o in ref.get_outputs()]
        stats = {name: OutputStats(name) for name in outputs}
        data = open_calibration(calib_data, prepared.inputs, config.batch_size, QUALITY_SAMPLES, calib_spec)
        samples, first = 0, None
        for batch in data:
            names = {i.name for i in ref.get_inputs()}
            batch = {k: v for k, v in batch.items() if k in names}
            n = batch_length(batch, prepared.inputs)
            first = first or one_sample(batch, prepared.inputs)  # a scalar or a state input stays whole
            for name, f, q in zip(outputs, ref.run(outputs, batch), got.run(outputs, batch)):
                stats[name].update(np.asarray(f), np.asarray(q), n)
            samples += n
        if first is None:
            return None
        lat = paired_latency(lambda: ref.run(outputs, first), lambda: got.run(outputs, first))
    except Exception as exc:  # noqa: BLE001 - a report detail: it must not lose the written model
        log.warning("could not measure the quantized model against FP32 (%s: %s); the report has no quality",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    per_output = {name: {"cosine_mean": st.cosine_mean, "cosine_min": st.cosine_min,
                         "sqnr_db": st.sqnr_db if np.isfinite(st.sqnr_db) else None,
                         "identical": st.whole.sse == 0.0} for name, st in stats.items()}
    worst = min(per_output, key=lambda k: per_output[k]["cosine_mean"])
    return {"samples": samples, "reference": str(source) if as_given else "the prepared float model",
            "outputs": per_output, "worst_output": worst,
            "latency_batch1": {**lat.to_dict(), "providers": providers},
            "seconds": round(time.perf_counter() - t, 3)}


LOW_COSINE = 0.99  # verify's default min_cosine: below it on the calibration samples, a plain quantize warns


def warn_far_from_float(quality: dict[str, Any] | None) -> str | None:
    """One warning when the written model's worst output is far from FP32 already on the calibration samples
    (mean cosine under :data:`LOW_COSINE`, which ``qconvert verify`` would fail on held-out data too): a plain
    quantize has no accuracy target to fail, but the number it prints should not pass unnoticed (Silero VAD's
    default W8A8: cosine 0.85, 5.4 dB). Returns the message (None: nothing to say)."""
    if not quality:
        return None
    name = quality["worst_output"]
    worst = quality["outputs"][name]
    if worst["cosine_mean"] >= LOW_COSINE:
        return None
    sqnr = f", SQNR {worst['sqnr_db']:.1f} dB" if worst["sqnr_db"] is not None else ""
    message = (f"the quantized model is far from FP32 on the calibration samples: output {name!r} cosine "
               f"{worst['cosine_mean']:.4f}{sqnr} (verify fails under {LOW_COSINE:g}). Fix: `qconvert analyze` names "
               "the layers that cause it; the accuracy search keeps them in float or 16 bits (--target-metric "
               "cosine --eval DIR, or a metric of your own); `qconvert verify` measures held-out data")
    log.warning("%s", message)
    return message


def ort_cpu_kernels(plan: QuantPlan, config: QuantConfig, data: bytes | None, qdq: onnx.ModelProto | None = None,
                    idx: GraphIndex | None = None) -> dict[str, Any] | None:
    """Target ``ort-cpu``: what ONNX Runtime CPU's optimized graph of the QDQ model runs quantized (QLinearConv,
    QGemm, MatMulNBits, ...) and which layer ops it runs in float (:func:`kernel_summary`), with ``qdq`` the layers
    it runs in float by name (:func:`runtime_accounting`). Warns when packed weights
    below 8 bits leave layers in float there: ONNX Runtime CPU has integer kernels for 8-bit weights, and for 4-bit
    ones only MatMulNBits (a block-wise MatMul weight read in float); any other packed 4-bit weight is dequantized
    and its layer runs in float, so the model is smaller but not faster (EfficientNet-Lite0 W4A8: 32.3 ms batch-1
    vs 8.1 ms FP32). Stored as int8 holding the same integers (``weights.storage``, ort-cpu's default) they run on
    its 8-bit kernels (4.55 ms); that is logged. None for other targets and for models over the protobuf limit
    (``data`` None)."""
    if config.target != "ort-cpu" or data is None:
        return None
    try:
        kernels = runtime_accounting(qdq, data, idx) if qdq is not None else kernel_summary(optimized_op_counts(data))
    except Exception as exc:  # noqa: BLE001 - a report detail: an optimizer failure must not lose the model
        log.warning("could not count what ONNX Runtime CPU's optimized graph runs quantized (%s: %s); the report "
                    "has no summary.ort_cpu_kernels", type(exc).__name__, exc)
        return None
    low = [t.name for t in plan.by_role(WEIGHT)
           if t.bitwidth < 8 and not (t.block_size and plan.layer_ops(t) == {"MatMul"})]  # MatMulNBits takes those
    boxed = [n for n in low if not plan.tensors[n].block_size] if config.low_bit_weights_as_int8 else []
    low = [n for n in low if n not in boxed]
    if boxed:
        log.info("%d weight(s) below 8 bits are written as int8 holding the same integers, so ONNX Runtime CPU runs "
                 "their layers on its 8-bit kernels (its optimized graph: %s; %d layer(s) in float); the encodings "
                 "file keeps their width (weights.storage: packed writes them packed: smaller, but ONNX Runtime CPU "
                 "then runs those layers in float)", len(boxed),
                 ", ".join(f"{v} {k}" for k, v in kernels["quantized_kernels"].items()) or "no integer kernel",
                 kernels["float_layers"])
    if low and kernels["float_layers"]:
        floats = ", ".join(f"{v} {k}" for k, v in kernels["float_layer_ops"].items())
        log.warning("%d weight(s) below 8 bits (e.g. %r) have no integer kernel in ONNX Runtime CPU: it dequantizes "
                    "them and runs their layers in float (its optimized graph: %s), so the model is smaller, not "
                    "faster; for speed there store them as int8 holding the same integers (weights.storage: int8, "
                    "the default on ort-cpu), keep these layers at 8 bits (weight_bits_overrides, e.g. "
                    "{\"op:Conv\": 8}) or use block-wise 4-bit MatMul weights (MatMulNBits); packed 4-bit Conv "
                    "weights pay off on a runtime with int4 kernels", len(low), low[0], floats)
    return kernels


def runtime_accounting(qdq: onnx.ModelProto, data: bytes | None = None, idx: GraphIndex | None = None) -> dict[str, Any]:
    """:func:`kernel_summary` of ONNX Runtime CPU's optimized graph of ``qdq``, plus the layers (Conv, ConvTranspose,
    Gemm, MatMul nodes of the main graph) it runs in float, by name, their share of the layers (``float_fraction``)
    and of the layers' MACs (``float_mac_fraction``, from ``idx``'s static shapes: the float model's index, whose
    node names the QDQ model keeps). What the report and the search count as float: what the runtime runs in float,
    not what the plan excluded (a layer whose producer lost its output Q runs in float too)."""
    run = runtime_layers(qdq, data)
    kernels = kernel_summary(run.counts)
    macs: dict[str, float] = {}
    if idx is not None:
        by_name = {n.name: n for n in idx.graph.node}
        macs = {x: node_macs(idx, by_name[x]) for x in run.layers if x in by_name}
    total = sum(macs.values())
    kernels.update({
        "compute_layers": len(run.layers),
        "float_layer_names": list(run.float_layers),
        "float_fraction": round(run.float_fraction, 4),
        "float_mac_fraction": round(sum(macs.get(x, 0.0) for x in run.float_layers) / total, 4) if total else None,
        **({"float_layer_ops_unnamed": run.unnamed} if run.unnamed else {}),
    })
    return kernels


def summary(plan: QuantPlan, qdq: onnx.ModelProto) -> dict[str, Any]:
    counts = plan.to_dict()["node_counts"]
    return {
        "nodes": counts,
        "quantized_tensors": {r: len(plan.by_role(r)) for r in ("activation", "weight", "bias")},
        "float_nodes": plan.float_nodes(),
        "float_subgraphs": plan.float_subgraphs,
        "subgraphs": plan.subgraphs,
        "subgraph_qdq_ops": subgraph_qdq_counts(qdq),
        "subgraph_nodes_reading_dq": {k: v for k, v in quantized_nodes_in_bodies(qdq).items() if v},
        "weights": plan.weight_layers(),
        "split_scale_groups": plan.split_groups,
        "mixed_range_operands": plan.mixed_operands,
        "qdq_model_ops": quantized_node_counts(qdq),
    }


def tensor_report(plan: QuantPlan, observers: dict, methods: dict[str, str]) -> dict[str, Any]:
    out = {}
    for name, enc in plan.encodings.items():
        t = plan.tensors[name]
        if enc.blocked:
            entry = {**t.to_dict(), "blocks": len(enc.scale), "scale_min": min(enc.scale),
                     "scale_max": max(enc.scale), "zero_points": sorted(set(enc.zero_point))}
        elif enc.per_channel:  # the per-channel values are in the encodings file; the report summarises them
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


def note_split_groups(plan: QuantPlan) -> None:
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


def warn_clipping(tensors: dict[str, dict[str, Any]]) -> None:
    clipped = sorted(((e["clipped_fraction"], n) for n, e in tensors.items()
                      if e.get("clipped_fraction", 0.0) > CLIP_WARNING), reverse=True)
    if clipped:
        worst = ", ".join(f"{n} {f:.1%} ({tensors[n]['calib_method']})" for f, n in clipped[:3])
        log.warning("%d activation(s) have more than %.0f%% of their calibration values clipped (worst: %s); if "
                    "accuracy drops, try calib_method minmax or percentile for them (calib_overrides), or run "
                    "`qconvert analyze`", len(clipped), CLIP_WARNING * 100, worst)


def write_json(path: Path, data: dict) -> None:
    import json

    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        raise TypeError(type(o).__name__)

    atomic_write_text(path, json.dumps(data, indent=2, default=default) + "\n")
