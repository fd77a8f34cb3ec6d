"""The end-to-end flow: load -> preprocess -> techniques -> plan -> calibrate -> encodings -> QDQ -> write.

:func:`run_flow` is the one flow every entry point runs (``quantize``, the accuracy search, ``analyze``);
:func:`quantize` runs it and :func:`finish` writes what it left. Nothing else lives here: the report is
assembled in :mod:`converter.report`, the encodings file written, read and applied in
:mod:`converter.encodings_file`, a one-shot calibration reader made replayable in :mod:`converter.calib.readers`,
and each stage is a function in its own module.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx

from .calib.readers import check_calibration_path, open_calibration
from .calib.observers import ObserverSettings, resolve_methods
from .calib.readers import replayable
from .calib.runner import CalibrationResult, collect
from .calib.subgraphs import collect_subgraph_ranges
from .config import LAYER_POSITIONS, QuantConfig
from .encodings_file import check_model, encodings_json
from .errors import ConfigError, ModelError, SlowerThanFloatError, UserError
from .export import export_for_quantize, is_torch_module
from .graph.model_io import (atomic_write_bytes, atomic_write_text, ensure_writable_dir, is_large, load_model,
                             removes_created_dirs, save_model, small_bytes)
from .graph.passes import default_opset, preprocess
from .graph.patterns import all_nodes
from .validation import ensure_float_model
from .options import (check_earlier_outputs, check_name, check_outputs_free, check_outside_data,
                      float_model_path, output_paths)
from .ort_session import select_providers, use_custom_op_libraries
from .quant.control_flow import (compute_subgraph_encodings, drop_uncalibrated, plan_subgraphs, render_control_flow,
                                 subgraph_activations, subgraph_summary)
from .quant.encode import activation_tensors, compute_encodings
from .quant.plan import QuantPlan, build_plan, drop_activations
from .report import (build_report, measure_quality, note_split_groups, ort_cpu_kernels, tensor_report,
                     warn_clipping, warn_far_from_float, write_json)
from .techniques import ENCODED_STAGE, FLOAT_STAGE, FlowState, Technique, applied_params, changes_float_model
from .techniques import enabled as enabled_techniques
from .techniques import failed as technique_failed

log = logging.getLogger("converter")


@dataclass
class QuantResult:
    """What :func:`quantize` produced."""

    model_path: Path
    encodings_path: Path
    report_path: Path
    plan: QuantPlan
    report: dict[str, Any] = field(default_factory=dict)
    model: onnx.ModelProto | None = None
    prepared_path: Path | None = None  # <name>.prepared.onnx, when a pass changed the float model (else None)


# the flow's state (converter.techniques.state): the prepared float model, its index, and what the techniques
# provide each other; ``Prepared`` is its name in the flow's functions
Prepared = FlowState


def prepare(model: Any, name: str | None = None, example_inputs: Any = None) -> Prepared:
    """Load (or export) the model and run the preprocessing passes."""
    source_path, float_model = _resolve_model(model, example_inputs)
    name = name or (Path(source_path).stem if source_path else "model")
    proto = load_model(float_model)
    ensure_float_model(proto)
    opset = default_opset(proto)
    from .quant.bias_correction import batchnorm_statistics

    # BatchNorm output -> per-channel (mean, std), read before preprocessing folds the BatchNorms (analytical bias
    # correction reads them, CLE updates them)
    bn_stats = batchnorm_statistics(proto)
    passes = preprocess(proto)
    log.debug("loaded %s (%d nodes, opset %d); preprocessed: %s", source_path or name, len(proto.graph.node), opset,
              ", ".join(f"{k} {v}" for k, v in passes.items() if v) or "no change")
    return Prepared(source_path, name, opset, proto, passes, provided={"bn_stats": bn_stats})


def check_technique_data(calib_data: Any, config: QuantConfig, techniques: list[Technique] | None = None) -> None:
    """Every enabled technique that reads calibration data gets some: else one error naming it (one the user
    switched on first, then those on by default), before any work. A calibration path that does not exist is the
    user's to fix whichever technique would read it first (SmoothQuant, on by default, named itself in that error)."""
    check_calibration_path(calib_data)
    if calib_data is not None:
        return
    default = QuantConfig()
    wanting = [t for t in (enabled_techniques(config) if techniques is None else techniques) if t.samples]
    for t in sorted(wanting, key=lambda t: bool(t.enabled(default))):
        raise t.missing_data()


def run_stage(state: Prepared, stage: str, techniques: list[Technique]) -> None:
    """Run the ``stage`` techniques of ``techniques`` in order; their report entries go to ``state.entries``. An
    error inside one names it and the techniques before it (:func:`converter.techniques.failed`)."""
    for t in techniques:
        if t.stage != stage:
            continue
        started = time.perf_counter()
        try:
            entry = t.run(state)
        except Exception as exc:  # noqa: BLE001 - re-raised, naming the technique
            raise technique_failed(t, state.ran, exc) from exc
        state.ran.append(t.name)
        state.timings[f"{t.name}_s"] = time.perf_counter() - started
        log.debug("technique %s: %.2f s%s", t.name, state.timings[f"{t.name}_s"], "" if entry else ", no change")
        if entry:
            state.entries[t.name] = entry


def run_flow(state: Prepared, calib_data: Any, config: QuantConfig, calib_spec: str | Path | None = None, *,
             keep: int = 64, searchable_only: bool = False, encoded_stage: bool = True,
             t0: float | None = None) -> Prepared:
    """The one flow every entry point runs: the float-stage techniques -> plan (main graph and If/Loop/Scan
    bodies) -> calibrate -> encodings -> the encoded-stage techniques (unless ``encoded_stage`` is False).

    ``quantize`` renders and writes what it leaves in ``state`` (plan, calibration, techniques' entries), the
    search (``searchable_only``: the techniques whose contract lets the search use them) re-plans from it trial by
    trial, and ``analyze`` measures it. ``calib_data`` is made :func:`replayable` with ``keep`` items (at least
    what the enabled techniques read)."""
    techniques = enabled_techniques(config, searchable_only=searchable_only)
    check_technique_data(calib_data, config, techniques)
    state.config, state.calib_spec = config, calib_spec
    state.calib_data = replayable(calib_data, max([keep] + [t.samples for t in techniques]))
    for t in techniques:
        for fact in t.promises:
            state.provided[fact] = True
    run_stage(state, FLOAT_STAGE, techniques)
    state.plan, state.subs = plan_model(state, state.config)
    config = state.config
    log.debug("plan: target %s, quantized tensors: %s; %d node(s) in float", config.target,
              ", ".join(f"{len(state.plan.by_role(r))} {r}" for r in ("activation", "weight", "bias")),
              len(state.plan.float_nodes()))
    if t0 is not None:
        state.timings["load_and_plan_s"] = time.perf_counter() - t0
    state.calib = calibrate(state, activation_tensors(state.plan), state.calib_data, config, calib_spec)
    state.timings["calibration_s"] = state.calib.seconds
    state.provided["uncalibrated"] = (calibrate_subgraphs(state, state.subs, state.calib, state.calib_data, config,
                                                          calib_spec) if state.subs else [])
    t = time.perf_counter()
    encode_model(state, state.plan, state.subs, state.calib.observers, state.calib.methods, config)
    warn_float_subgraphs(state.plan, config)
    if encoded_stage:
        state.snapshot_params()
        run_stage(state, ENCODED_STAGE, techniques)
    state.timings["encode_s"] = time.perf_counter() - t
    return state


def kept_edits(edits: dict[str, Any], plan: QuantPlan) -> dict[str, Any]:
    """The techniques' edits of the tensors ``plan`` quantizes (weights and biases of its quantized layers): what a
    variant with some layers in float keeps; a float layer reads its original values."""
    return {n: v for n, v in edits.items() if n in plan.tensors}


def render_plan(prepared: Prepared, config: QuantConfig, observers: dict, methods: Any, uncalibrated: list[str],
                edits: dict[str, Any], label: Any = (), base: QuantConfig | None = None) -> tuple[QuantPlan, onnx.ModelProto]:
    """Plan ``config`` on the prepared model (its float values), encode it from ``observers`` with ``edits`` (the
    techniques' weight/bias values) applied to what it quantizes, and render the QDQ model: a variant of a
    calibrated flow (the accuracy search's tries, float where faster) costs a render, no calibration. A tensor the
    variant quantizes that calibration did not observe (a tail ahead of a float layer) stays in float. ``base``: the
    flow's own config, which the encodings are computed with (``config`` only adds what the variant keeps in float
    or at 16 bits); default ``config``."""
    plan, subs = plan_model(prepared, config, uncalibrated)
    unseen = {t.name for t in plan.by_role("activation") if t.name not in observers}
    if unseen:
        log.debug("%s: %d tensor(s) calibration did not observe stay in float: %s", label, len(unseen),
                  sorted(unseen)[:5])
        drop_activations(plan, unseen)
    with applied_params(prepared.idx, kept_edits(edits, plan)):
        base = base or config
        encode_model(prepared, plan, subs, observers, methods or base.calib_method, base)
        return plan, render_control_flow(prepared.model, plan.encodings, config.low_bit_weights_as_int8)


def prepare_output_dir(model: Any, calib_data: Any, output_dir: str | Path | None, name: str | None) -> Path:
    """Check ``name`` and the output folder before any work: writable, and no output over an input."""
    if output_dir is None:
        raise ConfigError("no output folder: output_dir is required",
                          "pass output_dir='quantized' (created if missing; the CLI's -o/--output-dir)")
    if name is not None:
        check_name(name)
    if is_torch_module(model):
        name = name or type(model).__name__
    check_outside_data(output_dir, calib_data)  # before the folder is created
    out_dir = ensure_writable_dir(output_dir)
    stem = name or (Path(model).stem if isinstance(model, (str, Path)) else None)
    if stem:
        qdq, enc, report = output_paths(out_dir, stem)
        paths = (qdq, enc, float_model_path(out_dir, stem), report)  # the report last: it lists the others
        check_outputs_free(paths, [model, calib_data if isinstance(calib_data, (str, Path)) else None])
        check_earlier_outputs(paths)
    return out_dir


def check_node_names(model: Any, config: QuantConfig) -> None:
    """``exclude_nodes`` and ``int16_nodes`` must name nodes of the (preprocessed) model: a typo would
    otherwise quantize everything without a word."""
    wanted = [("exclude_nodes", "exclude_nodes (--exclude-nodes or --config)", n) for n in config.exclude_nodes]
    wanted += [("int16_nodes", "int16_nodes (--config)", n) for n in config.int16_nodes]
    wanted += [("weight_bits_overrides", "weight_bits_overrides (--config)", n) for n in config.weight_bits_overrides
               if not n.startswith("op:") and n not in LAYER_POSITIONS]
    if not wanted:
        return
    if isinstance(model, onnx.ModelProto) and model.graph.node and all(n.name for n in all_nodes(model.graph)):
        proto = model
    else:
        proto = load_model(model)
        preprocess(proto)
    names = {n.name for n in all_nodes(proto.graph)}  # nodes inside If/Loop/Scan bodies count too
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


def calibrate_subgraphs(prepared: Prepared, subs: list, calib, calib_data: Any, config: QuantConfig,
                        calib_spec: str | Path | None = None) -> list[str]:
    """Ranges of the tensors inside If/Loop/Scan bodies (:mod:`converter.calib.subgraphs`), added to ``calib``;
    tensors without a range are named and left in float. Returns those tensors (a later plan of the same
    bodies drops them again: :func:`plan_model`)."""
    wanted = [t for t in subgraph_activations(subs) if t not in calib.observers]
    data = open_calibration(calib_data, prepared.inputs, config.batch_size, config.max_samples, calib_spec)
    observers, unreached, samples = collect_subgraph_ranges(prepared.model, wanted, data,
                                                             select_providers(config.providers), config.threads)
    if wanted and samples < calib.samples:  # a one-shot reader replays only its first items (Replayable)
        log.warning("the calibration data gave %d of its %d samples on its second reading (a one-shot reader?): the "
                    "ranges inside control flow come from those%s; pass a list or a directory to use every sample",
                    samples, calib.samples, " (none: the bodies stay in float)" if not samples else "")
    calib.observers.update(observers)
    for t in observers:
        calib.methods[t] = "minmax"
    drop_uncalibrated(subs, unreached)
    return unreached


def plan_model(prepared: Prepared, config: QuantConfig,
               uncalibrated: list[str] | None = None) -> tuple[QuantPlan, list]:
    """The main graph's plan and one plan per If/Loop/Scan body (none when ``quantize_subgraphs`` is off).

    ``uncalibrated``: body tensors an earlier calibration found no values for (:func:`calibrate_subgraphs`);
    they are left in float again, quietly (the calibration named them). Quantize and the accuracy-target
    search plan through here, so a body plans the same in both."""
    plan = build_plan(prepared.model, config, prepared.idx)
    subs = plan_subgraphs(prepared.model, config, warn=uncalibrated is None) if config.quantize_subgraphs else []
    if subs and uncalibrated:
        drop_uncalibrated(subs, uncalibrated, warn=False)
    return plan, subs


def encode_model(prepared: Prepared, plan: QuantPlan, subs: list, observers: dict, methods: Any,
                 config: QuantConfig) -> None:
    """Encodings of the main plan and of every body plan (merged into ``plan``), and the plan's account of
    which bodies are quantized (``plan.subgraphs``) and which stay in float (``plan.float_subgraphs``)."""
    compute_encodings(plan, prepared.idx, observers, methods, config, frozen=prepared.frozen,
                      centered=prepared.centered)
    compute_subgraph_encodings(plan, subs, observers, methods, config, centered=prepared.centered)
    plan.subgraphs = subgraph_summary(subs)
    quantized_bodies = {s["subgraph"] for s in plan.subgraphs if s["quantized_tensors"]}
    plan.float_subgraphs = [f for f in plan.float_subgraphs if not any(
        q == f"{f['node']}/{f['subgraph']}" or q.startswith(f"{f['node']}/{f['subgraph']}/") for q in quantized_bodies)]


def warn_float_subgraphs(plan: QuantPlan, config: QuantConfig) -> None:
    for sub in plan.float_subgraphs:
        log.warning("%s node %r: subgraph %r (%d nodes) is left in float (%s)", sub["op_type"], sub["node"],
                    sub["subgraph"], sub["nodes"], "nothing in it is quantized" if config.quantize_subgraphs
                    else "quantize_subgraphs is off")


@removes_created_dirs
def quantize(model: Any, calib_data: Any, config: QuantConfig | None = None, output_dir: str | Path | None = None,
             name: str | None = None, example_inputs: Any = None, calib_spec: str | Path | None = None,
             *, image_spec: str | Path | None = None, repair: Callable | None = None) -> QuantResult:
    """Quantize ``model`` (ONNX path, ModelProto or torch.nn.Module) with ``calib_data``.

    ``calib_data`` is a directory (``.npy``/``.npz`` or images + ``preprocess.yaml``; ``image_spec``: another
    preprocessing spec, ``calib_spec`` its old name), a Python iterable / ``get_next()`` reader of
    ``{input name: array}`` dicts, or for a single-input model an array (a batch along axis 0). Writes
    ``<output_dir>/<name>.qdq.onnx``, ``<name>.encodings`` and ``<name>.report.json`` (``output_dir`` is
    required, like ``quantize_static``'s output path); for a torch module also its float export ``<name>.onnx``.
    Never over the input model or the calibration data (checked before any work); a failed run leaves no
    folder it created. ``repair``: see :func:`finish` (``converter.quantize`` passes
    :func:`converter.search.speed.float_where_faster`).
    """
    config = config or QuantConfig()
    use_custom_op_libraries(config.custom_op_libraries)
    calib_spec = image_spec or calib_spec
    t0 = time.perf_counter()
    check_technique_data(calib_data, config)
    out_dir = prepare_output_dir(model, calib_data, output_dir, name)
    model = float_model_of(model, example_inputs, out_dir, name)
    state = prepare(model, name, example_inputs)
    check_node_names(state.model, config)
    run_flow(state, calib_data, config, calib_spec, t0=t0)
    t = time.perf_counter()
    qdq = render_control_flow(state.model, state.plan.encodings, state.config.low_bit_weights_as_int8)
    timings = {"load_and_plan_s": state.timings["load_and_plan_s"], "calibration_s": state.timings["calibration_s"],
               "render_s": state.timings["encode_s"] + time.perf_counter() - t,
               **{f"{n}_s": state.timings[f"{n}_s"] for n in state.ran}}  # each technique's own time
    return finish(state, state.plan, qdq, state.config, state.calib, out_dir, timings, t0,
                  extra_report=dict(state.entries) or None, calib_data=state.calib_data, calib_spec=calib_spec,
                  gate_latency=True, repair=repair)


def latency_limit(config: QuantConfig) -> float | None:
    """The plain quantize's latency limit, x FP32 on ONNX Runtime CPU (inf: none): ``config.max_latency_ratio``,
    else 1.0 on target ``ort-cpu``; None on another target with no explicit limit (ORT CPU is not its runtime)."""
    if config.max_latency_ratio is not None:
        return config.max_latency_ratio
    return 1.0 if config.target == "ort-cpu" else None


def latency_gate(report: dict[str, Any], config: QuantConfig) -> dict[str, Any] | None:
    """Whether the written model is fast enough where it runs: its batch-1 time over FP32's (the quality block's
    paired timing on ONNX Runtime CPU) against ``config.max_latency_ratio`` (default 1.0 on target ``ort-cpu``:
    a quantized model slower than FP32 is no success). None where there is nothing to judge: no ratio (a model too
    fast to time, or no quality block), or another target with no explicit limit (ORT CPU is not its runtime)."""
    ratio = ((report.get("quality") or {}).get("latency_batch1") or {}).get("ratio")
    limit = latency_limit(config)
    if ratio is None or limit is None:
        return None
    return {"ratio": round(ratio, 3), "max_latency_ratio": None if math.isinf(limit) else limit,
            "passed": ratio <= limit, "runtime": "onnxruntime CPU, batch 1, all optimizations"}


def _slower(report: dict[str, Any]) -> str:
    """The measured times and why a model is slower than FP32 (its float layers, else the Q/DQ work)."""
    lat = report["quality"]["latency_batch1"]
    floats = ((report.get("summary") or {}).get("ort_cpu_kernels") or {}).get("float_layers") or 0
    why = ("" if lat["ratio"] <= 1.0 else f"; {floats} layer(s) run in float there: report summary.ort_cpu_kernels"
           if floats else "; every layer runs on an integer kernel, yet the Q/DQ work around them costs more than "
           "they save")
    faster = report.get("float_where_faster") or {}
    if faster.get("float_layers"):
        why += (f"; the all-INT8 model ran x{faster['ratio_before']:.2f}, before the {len(faster['float_layers'])} "
                "layer(s) ORT CPU runs faster in float were kept in float (report: float_where_faster)")
    elif faster and not faster.get("skipped"):
        why += "; no layer runs measurably faster in float (report: float_where_faster)"
    return (f"x{lat['ratio']:.2f} FP32's time on ONNX Runtime CPU (batch 1, median of {lat['runs']} paired runs: FP32 "
            f"{lat['float']['median_ms']:.3f} ms, quantized {lat['quant']['median_ms']:.3f} ms{why})")


FASTER_FIX = ("keep this model in float on ORT CPU, quantize for the runtime that will run it (--target), or let the "
              "accuracy search choose (--target-metric: it keeps only models within the limit)")


def check_latency(result: QuantResult, config: QuantConfig) -> None:
    """After writing: :class:`SlowerThanFloatError` when the model broke its latency limit (:func:`latency_gate`);
    a warning when it is slower than FP32 within a limit the user raised."""
    gate = result.report.get("latency_gate")
    if not gate or (gate["passed"] and gate["ratio"] <= 1.0):
        return
    if gate["passed"]:
        log.warning("the quantized model is SLOWER than FP32: %s; within --max-latency-ratio %g. Fix: %s",
                    _slower(result.report), config.max_latency_ratio, FASTER_FIX)
        return
    raise SlowerThanFloatError(
        f"the quantized model is slower than allowed: {_slower(result.report)}, limit "
        f"x{gate['max_latency_ratio']:g} (--max-latency-ratio); it was written to {result.model_path}, "
        "marked in its report (latency_gate)",
        f"{FASTER_FIX}; or accept it with --max-latency-ratio {math.ceil(gate['ratio'] * 10) / 10:g} (inf: no limit)",
        result)


def stale_prepared(out_dir: Path, name: str, written: Path | None) -> Path | None:
    """A ``<name>.prepared.onnx`` that this run will not write: an earlier run's, to be removed after the writes
    so no float model is left beside encodings it does not fit. Checked before anything is written: a file of
    that name no earlier report lists is refused (:func:`check_earlier_outputs`), never deleted."""
    stale = float_model_path(out_dir, name)
    if written is not None or not stale.is_file():
        return None
    check_earlier_outputs((stale, output_paths(out_dir, name)[2]))
    return stale


def finish(prepared: Prepared, plan: QuantPlan, qdq: onnx.ModelProto, config: QuantConfig, calib, out_dir: Path,
           timings: dict[str, float], t0: float, extra_report: dict[str, Any] | None = None,
           calib_data: Any = None, calib_spec: str | Path | None = None, gate_latency: bool = False,
           repair: Callable[[Prepared, onnx.ModelProto, float, float], tuple | None] | None = None) -> QuantResult:
    """Check the QDQ model, then write it, the encodings file and the report (each atomically).

    With ``calib_data`` the report gets ``quality`` (:func:`measure_quality`); the report's ``binding`` records
    the SHA-256 of the float model, the prepared model, the encodings and the QDQ model (:mod:`.binding`). With
    ``gate_latency`` (a plain quantize; the search gates its own choice) the report gets ``latency_gate`` and a
    model over its limit raises :class:`SlowerThanFloatError` once everything is written (:func:`check_latency`);
    before that, ``repair(prepared, qdq, ratio, quantized ms)`` may return ``(plan, qdq, entry)``: a faster model to check,
    measure and write instead, and its entry in the report (``float_where_faster``, :mod:`converter.search.speed`)."""
    from .binding import file_entry, sha256_bytes
    # a float model over the protobuf limit gives a QDQ model with external data too (int8 weights are a quarter
    # of the size: the QDQ model of a 2-8 GiB model would fit one protobuf, but its users expect the same layout)
    external = is_large(prepared.model)
    data = None if external else small_bytes(qdq, deterministic=True)  # serialized once: checked, then written
    check_model(qdq, data)
    quality = None
    if calib_data is not None:
        quality = measure_quality(prepared, data if data is not None else qdq, calib_data, config, calib_spec)
        if quality:
            timings["quality_s"] = quality["seconds"]
    gate = latency_gate({"quality": quality}, config) if gate_latency else None
    if gate and not gate["passed"] and repair is not None:  # before the report's work: done once, for the model kept
        t = time.perf_counter()
        repaired = repair(prepared, qdq, gate["ratio"], quality["latency_batch1"]["quant"]["median_ms"])
        if repaired is not None:
            new_plan, new_qdq, entry = repaired
            timings["float_where_faster_s"] = time.perf_counter() - t
            extra_report = {**(extra_report or {}), "float_where_faster": entry}
            if new_qdq is not qdq:  # nothing written yet: check, measure and judge the faster model instead
                return finish(prepared, new_plan, new_qdq, config, calib, out_dir, timings, t0, extra_report,
                              calib_data, calib_spec, gate_latency)
    kernels = ort_cpu_kernels(plan, config, data, qdq, prepared.idx)
    encodings_text, aimet = encodings_json(plan, config, prepared.idx)
    tensors = tensor_report(plan, calib.observers, calib.methods)
    warn_clipping(tensors)
    note_split_groups(plan)
    name = prepared.name
    paths = output_paths(out_dir, name)
    if default_opset(qdq) > default_opset(prepared.model):  # renders upgrade quietly (once per trial/layer)
        log.info("upgraded the model from opset %d to %d (16-bit, 4-bit or block-wise QuantizeLinear/"
                 "DequantizeLinear)", default_opset(prepared.model), default_opset(qdq))
    changed = changes_float_model(extra_report or {})  # declared by each technique (converter.techniques)
    float_path = float_model_path(out_dir, name) if changed else None
    check_outputs_free((*paths, float_path) if float_path else paths, [prepared.source_path])
    check_earlier_outputs((paths[0], paths[1], float_path, paths[2]) if float_path else paths)  # the report last
    stale = stale_prepared(out_dir, name, float_path)
    report = build_report(prepared, plan, qdq, config, calib, kernels, aimet, tensors, extra_report, paths,
                          float_path)
    if quality:
        report["quality"] = quality
    if gate:
        report["latency_gate"] = gate
    t = time.perf_counter()
    if data is not None:
        atomic_write_bytes(paths[0], data)
    else:
        save_model(qdq, paths[0], external=external)
    atomic_write_text(paths[1], encodings_text)
    if float_path:  # the encodings name this model's tensors (SmoothQuant's Muls) and hold its changed weights
        save_model(prepared.model, float_path, external=external)
        log.info("%s changed the float model: %s is the float model the encodings apply to (apply-encodings, "
                 "verify against FP32 use it or the original: their outputs agree)", ", ".join(changed), float_path)
    if stale:
        stale.unlink(missing_ok=True)
        log.info("removed %s: an earlier quantize run wrote it; this run changed no float model, so its encodings "
                 "apply to the float model it was given", stale)
    report["binding"] = {
        "float_model": file_entry(prepared.source_path),
        "prepared_model": file_entry(float_path) if float_path else None,
        "encodings": {"path": str(paths[1]), "sha256": sha256_bytes(encodings_text.encode("utf-8"))},
        "qdq_model": ({"path": str(paths[0]), "sha256": sha256_bytes(data)} if data is not None else
                      file_entry(paths[0])),
        **({"removed_stale_prepared_model": str(stale)} if stale else {}),
    }
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    write_json(paths[2], report)
    log.info("wrote %s, %s, %s%s", *paths, f" and {float_path}" if float_path else "")
    result = QuantResult(*paths, plan=plan, report=report, model=qdq, prepared_path=float_path)
    if gate_latency:  # a plain quantize (the search judges its own models against its target)
        warn_far_from_float(report.get("quality"))
        check_latency(result, config)
    return result


def float_model_of(model: Any, example_inputs: Any, out_dir: Path, name: str | None) -> Any:
    """``model``, or for a torch module the path of its float ONNX export written into ``out_dir``."""
    return export_for_quantize(model, example_inputs, out_dir, name) if is_torch_module(model) else model


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


