"""Quant analyzer: where and why quantization hurts a model (AIMET QuantAnalyzer for ONNX).

:func:`analyze` quantizes the model exactly as :func:`converter.pipeline.quantize` does (same
preprocessing, plan, calibration and encodings) without writing a model, then runs these steps,
each a function over a :class:`Prepared` model, all of them rendering variants of the one QuantPlan
with :func:`~converter.quant.qdq.render_qdq` and a subset of its encodings:

``sanity``       FP32 check: the preprocessed model, and the QDQ renderer with every quantizer
                 bypassed (no encodings), against the original float model.
``split``        the metric with only weights+biases quantized, only activations, and everything:
                 which side hurts.
``sensitivity``  per layer, the metric with only that layer's quantizers enabled and with only that
                 layer's quantizers disabled (AIMET's two per-layer analyses).
``propagation``  per layer output, MSE / SQNR / cosine of the whole QDQ model's tensor against the
                 float model's (errors of earlier layers included; torch.ao.ns ``add_loggers``).
``shadow``       per layer, the layer alone fed the *float* inputs (fake-quantized by its input
                 encodings, weights quantized, output quantized) against its float output: the error
                 the layer adds by itself (``add_shadow_loggers``).
``weights``      per weight, SQNR of the quantized vs float values, per tensor and per channel.
``histograms``   per layer output, the calibration histogram with the encoding range marked, and the
                 fraction of calibration values the range clips.

Then :func:`converter.analysis.recommend.recommend` names the techniques to try, each with its evidence and
flag (``recommendations`` in the report, the HTML summary and the terminal).

Work is bounded: the whole-model metrics use ``eval_samples`` samples, the per-layer steps
``layer_samples`` (a few); histograms are rebinned to ``histogram_bins`` bins. The metric is a
built-in (:data:`~converter.analysis.metrics.MODEL_METRICS`) or the user's
``evaluate(model_path) -> float`` (higher is better).

Layers are ranked worst first by the metric with only that layer quantized, ties broken by the
shadow SQNR (the layer's own error); see :func:`rank_layers`.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from ..progress import tqdm

from .. import schema
from .._version import __version__
from ..binding import check_prepared_current, file_entry
from ..calib.readers import check_label_count, load_labels, model_inputs, open_calibration
from ..ort_session import use_custom_op_libraries
from ..calib.runner import collect, make_session
from ..config import QuantConfig
from ..errors import CalibrationDataError, ConfigError
from ..graph.index import GraphIndex
from ..graph.model_io import atomic_write_text, ensure_writable_dir, load_model, save_model
from ..quant.encoding import Encoding
from ..quant.layers import Layer, layer_model, plan_layers, unassigned_quantizers
from ..quant.plan import ACTIVATION, QuantPlan
from ..quant.control_flow import render_control_flow
from ..quant.qdq import render_qdq
from ..pipeline import prepare as prepare_model
from ..pipeline import run_flow
from ..techniques import applied_params
from ..quant.rules import weight_axis
from ..metrics import TensorStats, per_channel_sqnr, sqnr_db
from .compare import dequantized_name_map, with_outputs
from .html import render_html
from .metrics import MODEL_METRICS, finite_or_str
from .recommend import assess, channel_outlier_ratios, recommend, recommendation_lines

log = logging.getLogger("converter")

STEPS = ("sanity", "split", "sensitivity", "propagation", "shadow", "weights", "histograms")
Evaluate = Callable[[str], float]


@dataclass(frozen=True)
class AnalysisConfig:
    """What the analyzer computes and on how much data."""

    metric: str = "auto"  # auto (top1 with labels, else cosine) | cosine | top1-agreement | top1
    layer_metric: str = "cosine"  # metric of the per-layer sensitivity; "same" = ``metric`` (or evaluate())
    eval_samples: int = 64  # samples for the whole-model metrics (sanity, split)
    layer_samples: int = 8  # samples for the per-layer steps
    batch_size: int = 8
    histogram_bins: int = 48
    steps: tuple[str, ...] = STEPS
    worst: int = 10  # layers listed as the worst in the summary
    sanity_cosine: float = 0.9999  # the FP32 check passes at or above this output cosine
    tolerance: float | None = None  # metric drop with nothing to fix (None: recommend.NOTHING_TO_FIX per metric)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        bad = [s for s in self.steps if s not in STEPS]
        if bad:
            raise ConfigError(f"unknown analysis step(s) {', '.join(bad)}", f"use some of: {', '.join(STEPS)}")
        schema.check({f.name: getattr(self, f.name) for f in fields(self)}, ANALYSIS_KEYS,
                     "the analysis options (AnalysisConfig)", label="analysis option ")


_COUNT = ((int,), "an integer")
# the analysis options' schema (converter/schema.py: the validator of config and job files too)
ANALYSIS_KEYS: dict[str, schema.Key] = {
    "metric": schema.Key((str,), "a model metric", choices=("auto", *MODEL_METRICS)),
    "layer_metric": schema.Key((str,), "a layer metric", choices=("same", *MODEL_METRICS)),
    "eval_samples": schema.Key(*_COUNT, low=0, fix="set eval_samples to 0 (all) or a positive number"),
    "layer_samples": schema.Key(*_COUNT, low=1),
    "batch_size": schema.Key(*_COUNT, low=1),
    "histogram_bins": schema.Key(*_COUNT, low=1),
    "steps": schema.Key((tuple,), "a list of steps", items=str, choices=STEPS),
    "worst": schema.Key(*_COUNT, low=1),
    "sanity_cosine": schema.Key(schema.NUMBER, "a number", low=-1, high=1),
    "tolerance": schema.Key((*schema.NUMBER, schema.NONE), "a metric drop (a number) or null", low=0,
                            fix="pass --tolerance 0.005 (half a point of top-1) or leave it out"),
}


@dataclass
class Prepared:
    """The model quantized in memory: what every step works from."""

    original: onnx.ModelProto  # the float model as given
    model: onnx.ModelProto  # preprocessed float model (the QDQ models are rendered from it)
    idx: GraphIndex
    plan: QuantPlan
    observers: dict[str, Any]
    layers: list[Layer]
    calibration: dict[str, Any]
    preprocess: dict[str, Any]
    # weight/bias values the encoded-stage techniques (bias correction, AdaRound) wrote: ``model`` keeps its float
    # values (the FP32 rows), a render uses these for the tensors it quantizes (as the search does)
    edits: dict[str, np.ndarray] = field(default_factory=dict)

    def encodings(self, keep: Callable[[str], bool] = lambda t: True) -> dict[str, Encoding]:
        return {t: e for t, e in self.plan.encodings.items() if keep(t)}

    def render(self, keep: Callable[[str], bool] = lambda t: True) -> onnx.ModelProto:
        encodings = self.encodings(keep)
        with applied_params(self.idx, {n: v for n, v in self.edits.items() if n in encodings}):
            return render_control_flow(self.model, encodings)


@dataclass
class AnalysisResult:
    report_path: Path
    html_path: Path
    report: dict[str, Any] = field(default_factory=dict)


def prepare(model: Any, calib_data: Any, config: QuantConfig, calib_spec: str | Path | None = None,
            example_inputs: Any = None) -> Prepared:
    """The steps of :func:`converter.pipeline.quantize` up to the encodings, nothing written.

    Composes the pipeline's own ``prepare`` / ``calibrate`` and ``compute_encodings``, so the
    encodings are exactly ``quantize``'s. Where the calibration method keeps no histogram (min/max),
    a second pass over the calibration data records histograms of the layer outputs for the report.
    """
    t0 = time.perf_counter()
    state = prepare_model(model, example_inputs=example_inputs)
    # the FP32 reference: the model as given (a torch module: its export, already preprocessed)
    original = load_model(model if isinstance(model, (str, Path, onnx.ModelProto)) else state.model)
    run_flow(state, calib_data, config, calib_spec)  # quantize's flow: its techniques, If/Loop/Scan bodies planned
    edits = state.take_edits()  # the model is the float one again; renders put the edits back (Prepared.render)
    config, calib_data, calib = state.config, state.calib_data, state.calib
    pre, idx, plan = state.model, state.idx, state.plan
    layers = plan_layers(plan, idx)
    observers = dict(calib.observers)
    missing = [lay.output for lay in layers if lay.output in observers and getattr(observers[lay.output], "counts",
                                                                                    None) is None]
    if missing:
        data = open_calibration(calib_data, model_inputs(pre), config.batch_size, config.max_samples, calib_spec)
        hist = collect(pre, missing, data, "percentile", calib.providers, config.threads)
        observers.update(hist.observers)
    info = {"method": config.calib_method, "samples": calib.samples, "seconds": round(time.perf_counter() - t0, 3),
            "providers": calib.providers, "source": getattr(calib, "source", None), "techniques": list(state.entries),
            "subgraphs": plan.subgraphs}
    return Prepared(original, pre, idx, plan, observers, layers, info, state.passes, edits)


# --- evaluation --------------------------------------------------------------------------------------

class Evaluator:
    """Scores a model against the FP32 outputs of the reference model on fixed batches."""

    def __init__(self, reference: onnx.ModelProto, batches: list[dict[str, np.ndarray]], metric: str,
                 labels: np.ndarray | None, providers: list[str], threads: int = 0,
                 evaluate: Evaluate | None = None) -> None:
        self.batches, self.metric, self.labels = batches, metric, labels
        self.providers, self.threads, self.evaluate = providers, threads, evaluate
        self.output_names = [o.name for o in reference.graph.output]
        sess = make_session(reference, providers, threads, optimize=False)
        self.reference = [sess.run(self.output_names, b) for b in batches]
        self.samples = sum(next(iter(b.values())).shape[0] for b in batches)

    def subset(self, samples: int, metric: str | None = None, evaluate: Evaluate | None = None) -> "Evaluator":
        """The first batches covering ``samples`` samples (reference outputs reused)."""
        sub = object.__new__(Evaluator)
        sub.__dict__.update(self.__dict__)
        sub.batches, sub.reference, n = [], [], 0
        for batch, ref in zip(self.batches, self.reference):
            if n >= samples:
                break
            k = min(samples - n, next(iter(batch.values())).shape[0])
            sub.batches.append({name: v[:k] for name, v in batch.items()})
            sub.reference.append([r[:k] for r in ref])
            n += k
        sub.samples, sub.metric, sub.evaluate = n, metric or self.metric, evaluate
        return sub

    @property
    def name(self) -> str:
        return "evaluate()" if self.evaluate else self.metric

    def outputs(self, model: onnx.ModelProto) -> list[list[np.ndarray]]:
        sess = make_session(model, self.providers, self.threads, optimize=False)
        return [sess.run(self.output_names, b) for b in self.batches]

    def score(self, model: onnx.ModelProto) -> float:
        if self.evaluate is not None:
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "candidate.onnx"
                save_model(model, path)
                return float(self.evaluate(str(path)))
        return self.scores(model, [self.metric])[self.metric]

    def scores(self, model: onnx.ModelProto, metrics: list[str]) -> dict[str, float]:
        """Several built-in metrics from one run of ``model``."""
        per_sample: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
        offset = 0
        for ref, out in zip(self.reference, self.outputs(model)):
            n = ref[0].shape[0]
            labels = None if self.labels is None else self.labels[offset:offset + n]
            for m in metrics:
                per_sample[m].append(MODEL_METRICS[m][0](ref, out, labels))
            offset += n
        return {m: float(np.concatenate(v).mean()) for m, v in per_sample.items()}

    def max_abs_diff(self, model: onnx.ModelProto) -> float:
        diff = 0.0
        for ref, out in zip(self.reference, self.outputs(model)):
            for a, b in zip(ref, out):
                if np.issubdtype(a.dtype, np.floating) and a.size:
                    diff = max(diff, float(np.abs(a.astype(np.float64) - b).max()))
        return diff


def eval_batches(prep: Prepared, data: Any, samples: int, batch_size: int,
                 calib_spec: str | Path | None) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` evaluation samples (0: all); says so when the data holds more."""
    source = open_calibration(data, model_inputs(prep.model), batch_size, samples + 1 if samples else None,
                              calib_spec)
    batches = list(source)
    n = sum(next(iter(b.values())).shape[0] for b in batches)
    if samples and n > samples:  # one more than asked for: the data has more than are used
        last = {k: v[:-1] for k, v in batches[-1].items()}
        batches = batches[:-1] + ([last] if next(iter(last.values())).shape[0] else [])
        log.warning("model metrics use the first %d evaluation samples only (--eval-samples %d; "
                    "--eval-samples 0 uses all)", samples, samples)
    return batches


# --- steps -------------------------------------------------------------------------------------------

def step_sanity(prep: Prepared, ev: Evaluator, cfg: AnalysisConfig) -> dict[str, Any]:
    """Preprocessed float model and the bypassed QDQ render (no encodings) vs the original model."""
    out = {}
    for key, model in (("preprocessed", prep.model), ("quantizers_bypassed", render_qdq(prep.model, {}))):
        cos = ev.subset(ev.samples, "cosine").score(model)
        out[key] = {"output_cosine": cos, "max_abs_diff": ev.max_abs_diff(model)}
    out["passed"] = all(v["output_cosine"] >= cfg.sanity_cosine for v in out.values())
    return out


def step_split(prep: Prepared, ev: Evaluator) -> dict[str, Any]:
    """Metric with only weights (+biases), only activations, and everything quantized.

    With a discrete built-in metric (top-1...) the output cosine of each variant is reported too,
    and decides the verdict when the metric ties (a few samples rarely flip a top-1).
    """
    roles = {t: prep.plan.tensors[t].role for t in prep.plan.encodings}
    variants = {"fp32": lambda t: False, "weights_only": lambda t: roles[t] != ACTIVATION,
                "activations_only": lambda t: roles[t] == ACTIVATION, "all_quantized": lambda t: True}
    extra = ev.evaluate is None and ev.metric != "cosine"  # a discrete metric: show the output cosine too
    out: dict[str, Any] = {"output_cosine": {}} if extra else {}
    for k, keep in tqdm(variants.items(), desc="weights vs activations", disable=None, leave=False):
        model = prep.model if k == "fp32" else prep.render(keep)
        if extra:
            both = ev.scores(model, [ev.metric, "cosine"])
            out[k], out["output_cosine"][k] = both[ev.metric], both["cosine"]
        else:
            out[k] = ev.score(model)
    out["verdict"] = _verdict(out)
    if extra and out["verdict"] == _EQUAL:  # the discrete metric cannot tell: say so, then what the cosine says
        out["verdict"] = (f"{ev.name} is the same for all variants on {ev.samples} samples; by output cosine, "
                          f"{_verdict(out['output_cosine'])}")
    return out


_EQUAL = "weights and activations hurt equally"


def _verdict(v: dict[str, float]) -> str:
    drop_w, drop_a = v["fp32"] - v["weights_only"], v["fp32"] - v["activations_only"]
    return "activations hurt more" if drop_a > drop_w else "weights hurt more" if drop_w > drop_a else _EQUAL


def step_sensitivity(prep: Prepared, ev: Evaluator, rows: dict[str, dict]) -> dict[str, Any]:
    """Per layer: only its quantizers enabled, and only its quantizers disabled."""
    base = {"fp32": ev.score(prep.model), "all_quantized": ev.score(prep.render()), "metric": ev.name,
            "samples": ev.samples}
    for layer in tqdm(prep.layers, desc="per-layer sensitivity", unit="layer", disable=None, leave=False):
        own = set(layer.quantizers)
        rows[layer.name]["sensitivity"] = {
            "only_this_quantized": ev.score(prep.render(lambda t: t in own)) if own else base["fp32"],
            "only_this_float": ev.score(prep.render(lambda t: t not in own)) if own else base["all_quantized"],
        }
    return base


def step_activations(prep: Prepared, batches: list[dict[str, np.ndarray]], rows: dict[str, dict],
                     propagation: bool, shadow: bool) -> None:
    """Per-layer output errors: whole QDQ model (propagated) and each layer alone (shadow)."""
    layers, types, providers = prep.layers, prep.idx.elem_type, prep.calibration["providers"]
    shadow_layers = [lay for lay in layers if all(t in types for t in lay.inputs)] if shadow else []
    needed = {lay.output for lay in layers} | {t for lay in shadow_layers for t in lay.inputs}
    float_sess = make_session(with_outputs(prep.model, sorted(needed), types), providers,
                              optimize=False)
    fetch = sorted(needed)
    qdq_sess = q_fetch = None
    if propagation:
        qdq = prep.render()
        dq = dequantized_name_map(qdq)
        q_fetch = [dq.get(lay.output, lay.output) for lay in layers]
        qdq_sess = make_session(with_outputs(qdq, q_fetch), providers, optimize=False)
    prop = {lay.name: TensorStats() for lay in layers}
    shad = {lay.name: TensorStats() for lay in shadow_layers}
    sessions: dict[str, Any] = {}
    for batch in tqdm(batches, desc="layer outputs", unit="batch", disable=None, leave=False):
        values = dict(zip(fetch, float_sess.run(fetch, batch)))
        if qdq_sess is not None:
            for lay, q in zip(layers, qdq_sess.run(q_fetch, batch)):
                prop[lay.name].update(values[lay.output], q)
        for lay in shadow_layers:
            if lay.name not in sessions:
                sub = layer_model(prep.model, prep.idx, lay, values)
                enc = {t: prep.plan.encodings[t] for t in lay.inputs + lay.constants + [lay.output]
                       if t in prep.plan.encodings}
                sessions[lay.name] = make_session(render_qdq(sub, enc), providers, optimize=False)
            (q,) = sessions[lay.name].run([lay.output], {t: values[t] for t in lay.inputs})
            shad[lay.name].update(values[lay.output], q)
    for lay in layers:
        if propagation:
            rows[lay.name]["propagated"] = prop[lay.name].to_dict()
        if lay.name in shad:
            rows[lay.name]["shadow"] = shad[lay.name].to_dict()


NEGLIGIBLE_CHANNEL = 1e-4  # a channel whose max |w| is below this fraction of the layer's median is left out of
# the worst-channel figures (listed as negligible_channels instead)


def step_weights(prep: Prepared, rows: dict[str, dict]) -> None:
    """SQNR of each layer's quantized weight, per tensor and per output channel."""
    by_name = {n.name: n for n in prep.model.graph.node}
    for layer in prep.layers:
        w = layer.weight
        if w is None or w not in prep.plan.encodings:
            continue
        values = prep.idx.constant(w).astype(np.float32)
        enc = prep.plan.encodings[w]
        fq = enc.fake_quantize(values)
        axis = enc.axis if enc.per_channel and not enc.blocked else weight_axis(by_name[layer.name], prep.idx)
        entry: dict[str, Any] = {"tensor": w, "shape": list(values.shape), "per_channel": enc.per_channel,
                                 "sqnr_db": sqnr_db(values, fq)}
        if axis is not None and values.ndim > axis:
            ch = per_channel_sqnr(values, fq, axis)
            # dead channels (BatchNorm folded with a ~0 gamma: max |w| ~1e-9, the output is the bias) quantize
            # to zero, often because their weight scale was raised to fit the bias in int32: 0 dB, harmless
            amax = np.abs(np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)).max(axis=1)
            negligible = amax <= NEGLIGIBLE_CHANNEL * np.median(amax)
            live = np.where(negligible, np.inf, ch)
            finite = live[np.isfinite(live)]
            entry.update(axis=axis, channel_sqnr_db=[round(float(v), 2) if np.isfinite(v) else float(v) for v in ch],
                         min_channel_sqnr_db=float(live.min()), worst_channel=int(live.argmin()),
                         mean_channel_sqnr_db=float(finite.mean()) if finite.size else float("inf"),
                         negligible_channels=[int(i) for i in np.flatnonzero(negligible)])
        rows[layer.name]["weight"] = entry


def histogram_entry(obs: Any, enc: Encoding | None, bins: int) -> dict[str, Any]:
    """The observer's histogram rebinned to ``bins`` over the union of the data and encoding ranges."""
    lo_data, hi_data = obs.range()
    entry: dict[str, Any] = {"observed_min": lo_data, "observed_max": hi_data}
    if enc is not None and not enc.per_channel:
        entry["encoding_min"], entry["encoding_max"] = enc.mins()[0], enc.maxs()[0]
    counts = getattr(obs, "counts", None)
    if counts is None or obs.lo is None:
        return entry
    fine_edges = obs.edges()
    centers = (fine_edges[:-1] + fine_edges[1:]) / 2
    lo = min(lo_data, entry.get("encoding_min", lo_data))
    hi = max(hi_data, entry.get("encoding_max", hi_data))
    if hi <= lo:
        hi = lo + 1e-6
    hist, _ = np.histogram(np.clip(centers, lo, hi), bins=bins, range=(lo, hi), weights=counts)
    entry["histogram"] = {"lo": lo, "hi": hi, "counts": [int(c) for c in hist]}
    if "encoding_min" in entry:
        entry["clipped_fraction"] = obs.clipped_fraction(entry["encoding_min"], entry["encoding_max"], enc.scale[0])
    return entry


def step_histograms(prep: Prepared, rows: dict[str, dict], bins: int) -> None:
    for layer in prep.layers:
        t = layer.output
        if t in prep.observers:
            rows[layer.name]["activation"] = {"tensor": t,
                                              **histogram_entry(prep.observers[t], prep.plan.encodings.get(t), bins)}


# --- ranking and orchestration ----------------------------------------------------------------------

def rank_layers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Worst first: lowest metric with only this layer quantized, then lowest shadow / propagated SQNR."""
    def key(r: dict) -> tuple:
        sens = r.get("sensitivity", {}).get("only_this_quantized", float("inf"))
        shadow = r.get("shadow", {}).get("sqnr_db", float("inf"))
        prop = r.get("propagated", {}).get("sqnr_db", float("inf"))
        return (sens, shadow, prop, r["position"])
    return sorted(rows, key=key)


def _layer_row(layer: Layer) -> dict[str, Any]:
    return {"name": layer.name, "nodes": layer.nodes, "op_types": layer.op_types, "label": layer.label,
            "position": layer.position, "output": layer.output, "quantizers": layer.quantizers}


def _check_labels_first(model: Any, data: Any, labels: Any, cfg: "AnalysisConfig",
                        calib_spec: str | Path | None) -> None:
    """Before calibration (the long step): labels that cannot number the evaluation samples are an error now, not
    after the model ran. Checked where both the model and the data are files (a Python iterable is read once)."""
    if labels is None or not isinstance(model, (str, Path)) or not isinstance(data, (str, Path)):
        return
    label_arr = load_labels(labels)
    source = open_calibration(data, model_inputs(load_model(model)), cfg.batch_size, cfg.eval_samples or None,
                              calib_spec)
    check_label_count(source, label_arr, cfg.eval_samples or None)


def analyze(model: Any, calib_data: Any, config: QuantConfig | None = None, output_dir: str | Path = "analysis",
            eval_data: Any = None, labels: Any = None, evaluate: Evaluate | None = None,
            analysis: AnalysisConfig | None = None, calib_spec: str | Path | None = None,
            example_inputs: Any = None) -> AnalysisResult:
    """Analyze where quantization hurts ``model``; writes ``report.json`` and ``report.html`` to ``output_dir``.

    ``eval_data`` defaults to the calibration data; ``labels`` (sequence, ``.npy`` or text file of
    class indices, in the order of the evaluation samples) enables the ``top1`` metric; ``evaluate``
    replaces the built-in metric by ``evaluate(model_path) -> float`` (higher is better). A
    ``torch.nn.Module`` is exported first (``example_inputs`` required), as in ``quantize``.
    """
    config = config or QuantConfig()
    use_custom_op_libraries(config.custom_op_libraries)
    cfg = analysis or AnalysisConfig()
    check_prepared_current(model)  # a <name>.prepared.onnx left from an earlier quantize run: refused
    out_dir = ensure_writable_dir(output_dir)
    _check_labels_first(model, eval_data if eval_data is not None else calib_data, labels, cfg, calib_spec)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prep = prepare(model, calib_data, config, calib_spec, example_inputs)
    timings["prepare_s"] = time.perf_counter() - t0

    label_arr = load_labels(labels)
    metric = cfg.metric if cfg.metric != "auto" else ("top1" if label_arr is not None else "cosine")
    if MODEL_METRICS[metric][1] and label_arr is None and evaluate is None:
        raise ConfigError(f"metric {metric!r} needs labels", "pass --labels FILE, or use --metric cosine")
    batches = eval_batches(prep, eval_data if eval_data is not None else calib_data, cfg.eval_samples,
                           cfg.batch_size, calib_spec)
    n_eval = sum(next(iter(b.values())).shape[0] for b in batches)
    if label_arr is not None and len(label_arr) < n_eval:
        raise CalibrationDataError(f"{len(label_arr)} labels for {n_eval} evaluation samples",
                                   "give one label per evaluation sample, in order")
    ev = Evaluator(prep.original, batches, metric, label_arr, prep.calibration["providers"], config.threads, evaluate)
    layer_ev = (ev.subset(cfg.layer_samples, evaluate=evaluate) if cfg.layer_metric == "same"
                else ev.subset(cfg.layer_samples, cfg.layer_metric))
    if MODEL_METRICS.get(layer_ev.metric, (None, False))[1] and label_arr is None and layer_ev.evaluate is None:
        raise ConfigError(f"layer metric {layer_ev.metric!r} needs labels", "pass --labels FILE")
    layer_batches = layer_ev.batches

    rows = {lay.name: _layer_row(lay) for lay in prep.layers}
    report: dict[str, Any] = {
        "converter_version": __version__,
        "model": {"source": str(model) if isinstance(model, (str, Path)) else None,
                  "sha256": (file_entry(model) or {}).get("sha256") if isinstance(model, (str, Path)) else None,
                  "nodes": len(prep.model.graph.node), "layers": len(prep.layers)},
        "config": config.to_dict(),
        "analysis_config": {**asdict(cfg), "steps": list(cfg.steps)},
        "calibration": prep.calibration,
        "preprocess": prep.preprocess,
        "evaluation": {"metric": ev.name, "samples": ev.samples, "layer_metric": layer_ev.name,
                       "layer_samples": layer_ev.samples, "labels": label_arr is not None},
        "plan": {"node_counts": prep.plan.to_dict()["node_counts"], "float_nodes": prep.plan.float_nodes(),
                 "quantized_tensors": len(prep.plan.encodings),
                 "unassigned_quantizers": unassigned_quantizers(prep.plan, prep.layers)},
    }

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        result = fn()
        timings[f"{name}_s"] = time.perf_counter() - t
        log.info("analysis step %s: %.1f s", name, timings[f"{name}_s"])
        return result

    steps = set(cfg.steps)
    if "sanity" in steps:
        report["sanity"] = timed("sanity", lambda: step_sanity(prep, ev, cfg))
    if "split" in steps:
        report["split"] = timed("split", lambda: step_split(prep, ev))
    if "sensitivity" in steps:
        report["sensitivity"] = timed("sensitivity", lambda: step_sensitivity(prep, layer_ev, rows))
    if steps & {"propagation", "shadow"}:
        timed("layer_outputs", lambda: step_activations(prep, layer_batches, rows, "propagation" in steps,
                                                        "shadow" in steps))
    if "weights" in steps:
        timed("weights", lambda: step_weights(prep, rows))
    if "histograms" in steps:
        timed("histograms", lambda: step_histograms(prep, rows, cfg.histogram_bins))

    ranked = rank_layers(list(rows.values()))
    report["layers"] = list(rows.values())
    report["worst_layers"] = [r["name"] for r in ranked[:cfg.worst]]
    ratios = channel_outlier_ratios(prep.model, prep.idx, layer_batches, prep.calibration["providers"])
    report["assessment"] = assess(report, cfg.tolerance)
    report["recommendations"] = recommend(report, prep.model, prep.idx, prep.observers, config, ratios,
                                          cfg.tolerance)
    timings["total_s"] = time.perf_counter() - t0
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return write_report(report, out_dir)


def write_report(report: dict[str, Any], out_dir: Path) -> AnalysisResult:
    clean = finite_or_str(report)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    atomic_write_text(json_path, json.dumps(clean, indent=1) + "\n")
    atomic_write_text(html_path, render_html(clean))
    log.info("wrote %s and %s", json_path, html_path)
    return AnalysisResult(json_path, html_path, clean)


def summary_text(report: dict[str, Any]) -> str:
    ev = report["evaluation"]
    lines = [f"analyzed {report['model']['layers']} layers; metric {ev['metric']} on {ev['samples']} samples, "
             f"per-layer {ev['layer_metric']} on {ev['layer_samples']}"]
    if "sanity" in report:
        s = report["sanity"]
        lines.append(f"FP32 sanity: {'PASSED' if s['passed'] else 'FAILED'} (bypassed QDQ output cosine "
                     f"{s['quantizers_bypassed']['output_cosine']:.6f})")
    if "split" in report:
        s = report["split"]
        lines.append(f"fp32 {s['fp32']:.6f}  weights only {s['weights_only']:.6f}  activations only "
                     f"{s['activations_only']:.6f}  all {s['all_quantized']:.6f}: {s['verdict']}")
        if "output_cosine" in s:
            c = s["output_cosine"]
            lines.append(f"  output cosine: weights only {c['weights_only']:.6f}  activations only "
                         f"{c['activations_only']:.6f}  all {c['all_quantized']:.6f}")
    rows = {r["name"]: r for r in report["layers"]}
    lines.append("worst layers:")
    for name in report["worst_layers"]:
        r = rows[name]
        sens = r.get("sensitivity", {}).get("only_this_quantized")
        shadow = r.get("shadow", {}).get("sqnr_db")
        parts = [f"only-this-quantized {sens:.5f}" if isinstance(sens, float) else "",
                 f"shadow SQNR {shadow:.1f} dB" if isinstance(shadow, float) else ""]
        lines.append(f"  {name} ({r['label']}): " + ", ".join(p for p in parts if p))
    if "recommendations" in report:
        lines += recommendation_lines(report["recommendations"], report.get("assessment"))
    return "\n".join(lines)
