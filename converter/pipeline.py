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

from ._version import __version__
from .calib.readers import batch_length, one_sample, open_calibration
from .calib.observers import ObserverSettings, resolve_methods
from .calib.runner import CalibrationResult, collect, make_session, select_providers
from .calib.subgraphs import collect_subgraph_ranges
from .config import LAYER_POSITIONS, QuantConfig
from .errors import ConfigError, EncodingsError, ModelError, UserError
from .graph.index import GraphIndex
from .graph.macs import node_macs
from .graph.model_io import (atomic_write_bytes, atomic_write_text, ensure_writable_dir, external_copy, is_large,
                             load_model, removes_created_dirs, save_model, small_bytes)
from .graph.passes import default_opset, preprocess
from .graph.patterns import all_nodes
from .graph.scopes import scopes, wrapper
from .validation import ensure_float_model
from .options import (FLOAT_SUFFIX, check_earlier_outputs, check_name, check_outputs_free, check_outside_data,
                      float_model_path, output_paths)
from .quant.aimet_rules import TIED_OP_TYPES, derive_omitted, file_entries, tie_conflicts
from .quant.encode import activation_tensors, compute_encodings
from .quant.encoding import Encoding
from .quant.encodings_io import FloatEncoding, dumps_encodings, read_encodings
from .quant.plan import ACTIVATION, BIAS, WEIGHT, QuantPlan, build_plan
from .quant.control_flow import (compute_subgraph_encodings, drop_uncalibrated, plan_subgraphs,
                                 quantized_nodes_in_bodies, render_control_flow, subgraph_activations,
                                 subgraph_qdq_counts, subgraph_summary)
from .ort_session import kernel_summary, optimized_op_counts, runtime_layers, use_custom_op_libraries
from .export import export_for_quantize, is_torch_module
from .quant.qdq import quantized_node_counts
from .quant.rules import block_axis, weight_axis
from .techniques import ENCODED_STAGE, FLOAT_STAGE, FlowState, Technique, changes_float_model
from .techniques import enabled as enabled_techniques
from .techniques import failed as technique_failed

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


def check_technique_data(calib_data: Any, config: QuantConfig, techniques: list[Technique] | None = None) -> None:
    """Every enabled technique that reads calibration data gets some: else one error naming it (one the user
    switched on first, then those on by default), before any work."""
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
             *, image_spec: str | Path | None = None) -> QuantResult:
    """Quantize ``model`` (ONNX path, ModelProto or torch.nn.Module) with ``calib_data``.

    ``calib_data`` is a directory (``.npy``/``.npz`` or images + ``preprocess.yaml``; ``image_spec``: another
    preprocessing spec, ``calib_spec`` its old name), a Python iterable / ``get_next()`` reader of
    ``{input name: array}`` dicts, or for a single-input model an array (a batch along axis 0). Writes
    ``<output_dir>/<name>.qdq.onnx``, ``<name>.encodings`` and ``<name>.report.json`` (``output_dir`` is
    required, like ``quantize_static``'s output path); for a torch module also its float export ``<name>.onnx``.
    Never over the input model or the calibration data (checked before any work); a failed run leaves no
    folder it created.
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
    qdq = render_control_flow(state.model, state.plan.encodings)
    timings = {"load_and_plan_s": state.timings["load_and_plan_s"], "calibration_s": state.timings["calibration_s"],
               "render_s": state.timings["encode_s"] + time.perf_counter() - t,
               **{f"{n}_s": state.timings[f"{n}_s"] for n in state.ran}}  # each technique's own time
    return finish(state, state.plan, qdq, state.config, state.calib, out_dir, timings, t0,
                  extra_report=dict(state.entries) or None,
                  calib_data=state.calib_data, calib_spec=calib_spec)


QUALITY_SAMPLES = 32  # calibration samples quantize compares the QDQ model with FP32 on (output cosine, SQNR)


def measure_quality(prepared: Prepared, qdq: onnx.ModelProto | bytes, calib_data: Any, config: QuantConfig,
                    calib_spec: str | Path | None = None) -> dict[str, Any] | None:
    """What a plain quantize says about the model it wrote: per output, the mean per-sample cosine and the SQNR
    of the QDQ model against FP32 on the first :data:`QUALITY_SAMPLES` calibration samples (the definitions of
    ``verify``'s table), and the batch-1 latency of both on ONNX Runtime CPU, all optimizations, interleaved
    (:func:`converter.timing.paired_latency`: medians and p10-p90). FP32 is the float model as given (its file),
    else the prepared one. None, with a warning, when either model cannot run (the files are still written)."""
    from .calib.runner import make_session
    from .timing import paired_latency
    from .verify import OutputStats

    t = time.perf_counter()
    try:
        source = prepared.source_path
        as_given = bool(source and Path(source).is_file() and not is_large(prepared.model))
        reference = load_model(source) if as_given else prepared.model
        providers = ["CPUExecutionProvider"]
        ref = make_session(reference, providers, config.threads, full_optimization=True)
        got = make_session(qdq, providers, config.threads, full_optimization=True)
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
           calib_data: Any = None, calib_spec: str | Path | None = None) -> QuantResult:
    """Check the QDQ model, then write it, the encodings file and the report (each atomically).

    With ``calib_data`` the report gets ``quality`` (:func:`measure_quality`); the report's ``binding`` records
    the SHA-256 of the float model, the prepared model, the encodings and the QDQ model (:mod:`.binding`)."""
    from .binding import file_entry, sha256_bytes
    # a float model over the protobuf limit gives a QDQ model with external data too (int8 weights are a quarter
    # of the size: the QDQ model of a 2-8 GiB model would fit one protobuf, but its users expect the same layout)
    external = is_large(prepared.model)
    data = None if external else small_bytes(qdq, deterministic=True)  # serialized once: checked, then written
    check_model(qdq, data)
    kernels = ort_cpu_kernels(plan, config, data, qdq, prepared.idx)
    encodings_text, aimet = encodings_json(plan, config, prepared.idx)
    tensors = _tensor_report(plan, calib.observers, calib.methods)
    _warn_clipping(tensors)
    _note_split_groups(plan)
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
        "summary": {**_summary(plan, qdq), **({"ort_cpu_kernels": kernels} if kernels else {})},
        "encodings_file": aimet,
        **(extra_report or {}),
        "tensors": tensors,
        "plan": plan.to_dict(),
        "outputs": {"model": str(paths[0]), "encodings": str(paths[1]), "report": str(paths[2]),
                    **({"float_model": str(float_path)} if float_path else {})},
    }
    if calib_data is not None:
        quality = measure_quality(prepared, data if data is not None else qdq, calib_data, config, calib_spec)
        if quality:
            report["quality"] = quality
            timings["quality_s"] = quality["seconds"]
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
    _write_json(paths[2], report)
    log.info("wrote %s, %s, %s%s", *paths, f" and {float_path}" if float_path else "")
    return QuantResult(*paths, plan=plan, report=report, model=qdq, prepared_path=float_path)


def apply_encodings(model: Any, encodings: str | Path, output: str | Path) -> onnx.ModelProto:
    """Float model + encodings file -> the QDQ model (the same bytes ``quantize`` wrote).

    When the quantize report beside the encodings records them, ``model`` must be the file they were made for
    (:func:`converter.binding.check_encodings_model`): the ``<name>.prepared.onnx`` quantize wrote, else the
    float model it was given."""
    from .binding import check_encodings_model

    output = Path(output)
    ensure_writable_dir(output.parent if str(output.parent) else ".")
    check_encodings_model(model, encodings)
    float_model = load_model(model)
    preprocess(float_model)
    enc_file = read_encodings(encodings)
    encs = _encodings_for_model(float_model, enc_file, str(encodings))
    qdq = render_control_flow(float_model, encs)
    check_model(qdq)
    save_model(qdq, output, external=is_large(float_model))  # the layout quantize writes
    return qdq


def encodings_json(plan: QuantPlan, config: QuantConfig, idx: GraphIndex) -> tuple[str, dict[str, Any]]:
    """The encodings file's text, and what it left out for AIMET (see :mod:`.quant.aimet_rules`)."""
    written, floats = file_entries(idx, plan.encodings, config.encodings_version, config.encodings_all_tensors)
    acts: dict[str, Encoding | FloatEncoding] = {}
    params: dict[str, Encoding | FloatEncoding] = {}
    for n, e in written.items():  # what the plan does not hold (aimet_rules.aimet_additions) is an activation to AIMET
        (acts if n not in plan.tensors or plan.tensors[n].role == ACTIVATION else params)[n] = e
    acts.update({n: FloatEncoding(32) for n in sorted(floats, key=lambda t: (idx.position(t), t))})
    args = {
        "activation_bitwidth": config.activation_bits,
        "param_bitwidth": config.weight_bits,  # the default: per-layer widths are in each entry (bw)
        "dtype": "int",
        "is_symmetric": config.preset.activation_symmetric,
        "per_channel_quantization": config.per_channel,
        "quant_scheme": _QUANT_SCHEMES.get(config.calib_method, config.calib_method),
    }
    ragged = [n for n, e in written.items() if e.blocked and idx.shape.get(n) and idx.shape[n][e.axis] % e.block_size]
    if ragged:
        log.warning("%d block-wise weight(s) have a ragged last block (first: %r, %d input channels, blocks of %d): "
                    "ONNX and ONNX Runtime run it, AIMET and QNN take only input channels divisible by the block size "
                    "(AIMET keeps such layers per channel)", len(ragged), ragged[0], idx.shape[ragged[0]][
                        written[ragged[0]].axis], written[ragged[0]].block_size)
    left_out = [n for n in plan.encodings if n not in written]
    conflicts = tie_conflicts(idx, plan.encodings)
    if conflicts:
        node, i, o = conflicts[0]
        log.warning("%d node(s) that AIMET ties (one quantizer for input and output: %s) have different input and "
                    "output encodings here (first: %s, %r vs %r); an AIMET sim keeps only one of them; "
                    "--target qnn ties them", len(conflicts), ", ".join(sorted(TIED_OP_TYPES)), node, i, o)
    info = {"version": config.encodings_version, "tensors": len(written),
            "omitted_biases": sum(plan.tensors[n].role == BIAS for n in left_out),
            "omitted_data_movement_outputs": sum(plan.tensors[n].role != BIAS for n in left_out),
            "marked_float": sorted(floats),
            "added_for_aimet": sorted(n for n in written if n not in plan.encodings),
            "aimet_tie_conflicts": [{"node": n, "input": i, "output": o} for n, i, o in conflicts]}
    return dumps_encodings(acts, params, args, config.encodings_version), info


def ort_cpu_kernels(plan: QuantPlan, config: QuantConfig, data: bytes | None, qdq: onnx.ModelProto | None = None,
                    idx: GraphIndex | None = None) -> dict[str, Any] | None:
    """Target ``ort-cpu``: what ONNX Runtime CPU's optimized graph of the QDQ model runs quantized (QLinearConv,
    QGemm, MatMulNBits, ...) and which layer ops it runs in float (:func:`kernel_summary`), with ``qdq`` the layers
    it runs in float by name (:func:`runtime_accounting`). Warns when weights
    below 8 bits leave layers in float there: ONNX Runtime CPU has integer kernels for 8-bit weights, and for 4-bit
    ones only MatMulNBits (a block-wise MatMul weight read in float); any other 4-bit weight is dequantized and
    its layer runs in float, so the model is smaller but not faster (EfficientNet-Lite0 W4A8: 13.6 ms batch-1 vs
    7.3 ms FP32). None for other targets and for models over the protobuf limit (``data`` None)."""
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
    if low and kernels["float_layers"]:
        floats = ", ".join(f"{v} {k}" for k, v in kernels["float_layer_ops"].items())
        log.warning("%d weight(s) below 8 bits (e.g. %r) have no integer kernel in ONNX Runtime CPU: it dequantizes "
                    "them and runs their layers in float (its optimized graph: %s), so the model is smaller, not "
                    "faster; for speed there keep these layers at 8 bits (weight_bits_overrides, e.g. "
                    "{\"op:Conv\": 8}) or use block-wise 4-bit MatMul weights (MatMulNBits); 4-bit Conv weights pay "
                    "off on a runtime with int4 kernels", len(low), low[0], floats)
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


def _encodings_for_model(model: onnx.ModelProto, enc_file, source: str) -> dict[str, Encoding]:
    idx = GraphIndex.build(model)
    tensors = set(idx.producer) | set(idx.graph_inputs) | set(idx.initializers)
    bodies = {}  # tensors read or defined inside If/Loop/Scan bodies -> the index of a body's wrapper
    for scope in scopes(model):
        body_idx = GraphIndex.build(wrapper(scope, model))
        for name in scope.used():  # defined there or captured (an outer weight read only inside the body)
            bodies.setdefault(name, body_idx)
    out: dict[str, Encoding] = {}
    for section in (enc_file.activations, enc_file.params):
        for name, enc in section.items():
            if isinstance(enc, FloatEncoding):
                continue
            if name not in tensors and name not in bodies:
                raise EncodingsError(f"{source}: tensor {name!r} is not in the model (if quantize wrote a "
                                     f"<name>{FLOAT_SUFFIX} next to it, SmoothQuant/CLE changed the float model)",
                                     f"apply the encodings to the float model they were computed for (<name>{FLOAT_SUFFIX} "
                                     "when quantize wrote one)")
            where = idx if name in tensors and (idx.uses(name) or name not in bodies) else bodies[name]
            if where.is_constant(name) and enc.per_channel and name in enc_file.axis_unknown:
                enc = dataclasses.replace(enc, axis=_param_axis(where, name, enc, source))
            if name in enc_file.block_unknown:
                enc = _param_blocks(where, name, enc, source)
            out[name] = enc
    floats = {n for sec in (enc_file.activations, enc_file.params) for n, e in sec.items() if isinstance(e, FloatEncoding)}
    return derive_omitted(idx, out, floats)


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


def _param_blocks(idx: GraphIndex, name: str, enc: Encoding, source: str) -> Encoding:
    """A 1.0.0 PER_BLOCK entry (flat scales in (output channel, block) order) shaped from the weight it
    encodes: the blocked axis and channel axis of its consumer (:mod:`.quant.rules`)."""
    shape = idx.shape.get(name, []) if idx.is_constant(name) else []
    for node in idx.uses(name):
        baxis, caxis = block_axis(node, idx), weight_axis(node, idx)
        if baxis is None or caxis is None or baxis >= len(shape) or caxis >= len(shape):
            continue
        block_shape = [1] * len(shape)
        block_shape[caxis], block_shape[baxis] = shape[caxis], -(-shape[baxis] // enc.block_size)
        if int(np.prod(block_shape)) != len(enc.scale):
            continue
        order = np.arange(len(enc.scale))
        if len(shape) == 2 and baxis == 0:  # written (channel, block): transposed back
            order = order.reshape(block_shape[::-1]).T.reshape(-1)
        return Encoding(enc.bitwidth, enc.signed, enc.symmetric, tuple(enc.scale[i] for i in order),
                        tuple(enc.zero_point[i] for i in order), baxis, enc.block_size, tuple(block_shape))
    raise EncodingsError(f"{source}: tensor {name!r} has {len(enc.scale)} block scales (block size {enc.block_size}), "
                         f"which fit no Conv/Gemm/MatMul weight layout of its shape {shape}",
                         "apply the encodings to the float model they were computed for")


def _summary(plan: QuantPlan, qdq: onnx.ModelProto) -> dict[str, Any]:
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


def _tensor_report(plan: QuantPlan, observers: dict, methods: dict[str, str]) -> dict[str, Any]:
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
