"""Automatic fallback to an accuracy target (after AMCT's accuracy-based auto calibration).

1. Quantize everything (one calibration pass, plus one for the tensors inside If/Loop/Scan bodies;
   the observers are kept).
2. Evaluate the float model (the baseline) and the fully quantized one. Done if the target holds.
3. Rank layers by single-op sensitivity (worst first), then let a strategy choose how many of the
   worst to keep in float; each try edits the QuantPlan (``exclude_nodes``), never the graph, and
   re-renders from the same observers, so a try costs one render and one evaluation, no calibration.
   Layers inside If/Loop/Scan bodies are layers like the others (node names are unique model-wide): a
   try plans, encodes and renders the main graph and every body the way ``quantize`` does
   (:func:`~converter.pipeline.plan_model`, :func:`~converter.pipeline.encode_model`,
   :func:`~converter.quant.control_flow.render_control_flow`).
4. Write the model that met the target, or, if none did, the best one found, with every evaluation
   in the report; an unmet target raises :class:`TargetNotMetError` *after* writing.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx
from ..progress import tqdm

from ..calib.readers import open_calibration
from ..calib.runner import capture, select_providers
from ..config import QuantConfig
from ..errors import EXIT_CHECK_FAILED, UserError
from ..graph.model_io import removes_created_dirs, save_model
from ..pipeline import (Prepared, QuantResult, calibrate, calibrate_subgraphs, check_node_names, encode_model, finish,
                        plan_model, prepare, prepare_output_dir, transform, warn_float_subgraphs)
from ..ort_session import use_custom_op_libraries
from ..pipeline import float_model_of
from ..quant.control_flow import render_control_flow
from ..quant.encode import activation_tensors
from ..quant.layers import Layer, owned_quantizers, plan_layers
from ..quant.plan import QuantPlan
from .evaluate import AccuracyTarget, Evaluator
from .sensitivity import LayerScore, end_to_end_sensitivity, propagated_sensitivity, single_op_sensitivity
from .sensitivity import rank as rank_scores
from .cost import COMPUTE_OPS, first_sample, layer_macs, measure_latency
from .giveback import give_back
from .strategies import STRATEGIES

log = logging.getLogger("converter")


class TargetNotMetError(UserError):
    """The accuracy target was not reached; the best model found was still written."""

    exit_code = EXIT_CHECK_FAILED


@dataclass
class Trial:
    label: str
    float_layers: list[str]
    metric: float
    passed: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "float_layers": self.float_layers, "metric": self.metric,
                "passed": self.passed, "seconds": round(self.seconds, 3)}


@dataclass
class Searcher:
    """Holds what every try shares: the prepared model, the observers and the evaluator."""

    prepared: Prepared
    config: QuantConfig
    observers: dict
    evaluate: Evaluator
    target: AccuracyTarget
    methods: dict[str, str] | None = None  # tensor -> calibration method (calib_overrides applied)
    uncalibrated: list[str] = field(default_factory=list)  # body tensors calibration got no values for
    trials: list[Trial] = field(default_factory=list)
    baseline: float = float("nan")
    _tmp: tempfile.TemporaryDirectory = field(default_factory=tempfile.TemporaryDirectory)

    def build(self, layers: list[LayerScore] | list[Layer], mode: str = "float") -> tuple[QuantPlan, onnx.ModelProto]:
        """The plan and QDQ model with ``layers`` kept in float (``mode="float"``) or at 16 bits."""
        names = tuple(n for layer in layers for n in layer.nodes)
        if mode == "int16":
            config = self.config.replace(int16_nodes=tuple(self.config.int16_nodes) + tuple(l.name for l in layers))
        else:
            config = self.config.replace(exclude_nodes=tuple(self.config.exclude_nodes) + names)
        plan, subs = plan_model(self.prepared, config, self.uncalibrated)
        encode_model(self.prepared, plan, subs, self.observers, self.methods or self.config.calib_method, self.config)
        return plan, render_control_flow(self.prepared.model, plan.encodings)

    def measure(self, model: onnx.ModelProto, label: str, float_layers: list[str]) -> Trial:
        path = Path(self._tmp.name) / "candidate.onnx"
        save_model(model, path)
        t = time.perf_counter()
        metric = float(self.evaluate(str(path)))
        trial = Trial(label, float_layers, metric, self.target.met(metric, self.baseline) if label != "fp32" else True,
                      time.perf_counter() - t)
        self.trials.append(trial)
        log.debug("%s: metric %.6f (%s)", label, metric, "pass" if trial.passed else "fail")
        return trial


@dataclass
class SearchOutcome:
    met: bool
    baseline: float
    threshold: float
    plan: QuantPlan
    qdq: onnx.ModelProto
    fallback_layers: list[LayerScore]
    ranking: list[LayerScore]
    trials: list[Trial]
    strategy: str
    seconds: float
    fallback: str = "float"  # what the kept layers fell back to: float | int16 | none
    prefix: int = 0  # layers the strategy kept (the smallest passing prefix of the ranking)
    costs: dict[str, float] = field(default_factory=dict)  # layer -> MACs per sample
    all_quantized: onnx.ModelProto | None = None

    def float_fraction(self) -> float:
        """Share of the compute layers (Conv, Gemm, MatMul) left in float (or 16 bits)."""
        compute = [s for s in self.ranking if s.op_type.split("+")[0] in COMPUTE_OPS]
        kept = {s.name for s in self.fallback_layers}
        return sum(s.name in kept for s in compute) / len(compute) if compute else 0.0

    def to_dict(self) -> dict[str, Any]:
        names = [s.name for s in self.fallback_layers]
        final = next((t for t in reversed(self.trials) if set(t.float_layers) == set(names) and t.label != "fp32"),
                     None)
        total = sum(self.costs.values())
        return {
            "met": self.met,
            "strategy": self.strategy,
            "fallback": self.fallback,
            "baseline_metric": self.baseline,
            "threshold": self.threshold,
            "final_metric": final.metric if final else None,
            "full_evaluations": len(self.trials),
            "strategy_prefix": self.prefix,
            "given_back": max(self.prefix - len(names), 0),
            "float_fraction": round(self.float_fraction(), 4),
            "float_mac_fraction": round(sum(self.costs.get(n, 0.0) for n in names) / total, 4) if total else 0.0,
            "fallback_layers": [{**s.to_dict(), "macs": self.costs.get(s.name)} for s in self.fallback_layers],
            "evaluations": [t.to_dict() for t in self.trials],
            "ranking": [{**s.to_dict(), "macs": self.costs.get(s.name)} for s in self.ranking],
            "seconds": round(self.seconds, 3),
        }


def give_back_order(layers: list[LayerScore], costs: dict[str, float]) -> list[LayerScore]:
    """Cheapest to quantize back first: least damage (1 - cosine) per MAC gained."""
    def key(s: LayerScore) -> tuple:
        damage = 1.0 - s.cosine if s.cosine == s.cosine else 1.0 - (s.metric or 0.0)
        return (max(damage, 0.0) / max(costs.get(s.name, 0.0), 1.0), -costs.get(s.name, 0.0), s.name)
    return sorted(layers, key=key)


def fallback_search(searcher: Searcher, ranking: list[LayerScore] | Callable[[], list[LayerScore]],
                    strategy: str = "gallop",
                    fallback: str = "float", costs: dict[str, float] | None = None,
                    give_back_layers: bool = True) -> SearchOutcome:
    """Find the fewest, cheapest layers to keep in float (``fallback="int16"``: at 16 bits) for the target.

    1. the strategy finds the smallest prefix of ``ranking`` that meets it;
    2. give-back re-quantizes the layers of that prefix the target does not need (:mod:`.giveback`);
    3. of every model that met the target, the one with the fewest MACs left in float is kept.

    ``ranking`` may be a function computing it: it is then called only when the fully quantized model
    misses the target. ``fallback="int16"`` first tries the ranked layers at 16 bits; if even all of them
    at 16 bits miss the target, the search keeps layers in float instead.
    """
    t0 = time.perf_counter()
    costs = costs or {}
    searcher.baseline = searcher.measure(searcher.prepared.model, "fp32", []).metric
    threshold = searcher.target.threshold(searcher.baseline)
    results: dict[tuple[str, frozenset], tuple[Trial, QuantPlan, onnx.ModelProto, list[LayerScore]]] = {}
    mode = "float"

    def attempt(layers: list[LayerScore], label: str | None = None) -> bool:
        key = (mode if layers else "none", frozenset(s.name for s in layers))
        if key not in results:
            plan, qdq = searcher.build(layers, mode)
            trial = searcher.measure(qdq, label or f"{len(layers)} layers in {mode}", [s.name for s in layers])
            results[key] = (trial, plan, qdq, list(layers))
        return results[key][0].passed

    with tqdm(total=None, desc=f"fallback search ({strategy})", unit="eval", disable=None, leave=False) as bar:
        ok = attempt([])
        bar.update(1)
        if callable(ranking):
            ranking = [] if ok else ranking()
        chooser = STRATEGIES[strategy](len(ranking))
        if not ok and fallback == "int16" and ranking:
            mode = "int16"
            if not attempt(ranking):  # even every layer at 16 bits misses the target: use float
                mode = "float"
            bar.update(1)
        while not ok and not chooser.done:
            chooser.step(attempt(ranking[:chooser.current]))
            bar.update(1)
            bar.set_postfix(layers=chooser.current, best=max(r[0].metric for r in results.values()))
        k = 0 if ok else chooser.result
        if k:
            attempt(ranking[:k])  # cached unless k is all n (assumed to pass); if it fails, the best seen is kept
        prefix = k
        if k > 1 and give_back_layers and results[(mode, frozenset(s.name for s in ranking[:k]))][0].passed:
            bar.set_description("give back")

            def passes(layers: list[LayerScore]) -> bool:
                ok_ = attempt(layers, f"give back: {len(layers)} layers in {mode}")
                bar.update(1)
                return ok_

            give_back(give_back_order(ranking[:k], costs), passes)
    passed = [key for key, r in results.items() if r[0].passed and key[0] in (mode, "none")]
    if passed:  # the fewest MACs left in float, then the fewest layers, then the best metric
        key = min(passed, key=lambda kk: (sum(costs.get(n, 0.0) for n in kk[1]), len(kk[1]), -results[kk][0].metric))
    else:  # nothing met it: keep the best model seen (fewest layers on a tie)
        key = max(results, key=lambda kk: (results[kk][0].metric, -len(kk[1])))
    trial, plan, qdq, layers = results[key]
    order = {s.name: i for i, s in enumerate(ranking)}
    layers = sorted(layers, key=lambda s: order[s.name])
    none = results.get(("none", frozenset()))
    return SearchOutcome(trial.passed, searcher.baseline, threshold, plan, qdq, layers, ranking,
                         list(searcher.trials), strategy, time.perf_counter() - t0, key[0], prefix, dict(costs),
                         none[2] if none else None)


RANKINGS = {
    "propagated": "each layer alone quantized, the whole model run on the sensitivity samples and its outputs "
                  "compared with FP32: the error a layer causes after every layer behind it (default)",
    "single-op": "each layer alone quantized, fed the float inputs, its own output compared (AMCT): no "
                 "propagation, cheapest, misses layers whose error later layers amplify",
    "end-to-end": "each layer alone quantized, the user's metric on the whole evaluation set (AIMET): one full "
                  "evaluation per layer",
}
FALLBACKS = ("auto", "float", "int16")
FLOAT_FRACTION_WARNING = 0.25  # more than this share of the compute layers in float: the result is barely INT8


class TooMuchFloatError(TargetNotMetError):
    """The target was met, but with more of the model in float than ``max_float_fraction`` allows."""


@removes_created_dirs
def auto_quantize(model: Any, calib_data: Any, evaluate: Evaluator, target: AccuracyTarget | None = None,
                  config: QuantConfig | None = None, output_dir: str | Path | None = None, name: str | None = None,
                  strategy: str = "gallop", sensitivity_samples: int = 8, ranking: str = "propagated",
                  fallback: str = "auto", calib_spec: str | Path | None = None, example_inputs: Any = None,
                  give_back_layers: bool = True, max_float_fraction: float | None = None,
                  latency: bool = True, latency_runs: int = 20, *, image_spec: str | Path | None = None
                  ) -> QuantResult:
    """Quantize, then keep the fewest, cheapest layers in float until ``target`` holds.

    ``evaluate(model_path) -> float`` scores a model (higher is better), e.g. a
    :class:`~converter.search.evaluate.BuiltinEvaluator`. ``ranking``: ``propagated`` (default),
    ``single-op`` or ``end-to-end`` (see :data:`RANKINGS`). ``fallback``: ``float``, ``int16`` (16-bit
    activations before float) or ``auto`` (int16 where the target runs 16 bits fast: qnn; float elsewhere).
    Raises :class:`TargetNotMetError` when no tried model meets the target, and :class:`TooMuchFloatError`
    when it is met with more than ``max_float_fraction`` of the compute layers in float; the best model
    found and the report are written first.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    if ranking not in RANKINGS:
        raise UserError(f"unknown ranking {ranking!r}", f"use one of {', '.join(RANKINGS)}")
    if fallback not in FALLBACKS:
        raise UserError(f"unknown fallback {fallback!r}", f"use one of {', '.join(FALLBACKS)}")
    if max_float_fraction is not None and not 0.0 <= max_float_fraction <= 1.0:
        raise UserError(f"max_float_fraction must be in [0, 1], got {max_float_fraction}",
                        "use e.g. --max-float-fraction 0.1 (at most 10% of the compute layers in float)")
    config = config or QuantConfig()
    use_custom_op_libraries(config.custom_op_libraries)
    calib_spec = image_spec or calib_spec  # one spelling with quantize and verify; calib_spec: the old one
    if fallback == "auto":
        fallback = "int16" if config.target == "qnn" else "float"
    elif fallback == "int16" and config.target != "qnn":
        log.warning("fallback int16 on target %s: ONNX Runtime CPU has no fast 16-bit kernels, so a 16-bit layer "
                    "runs no faster than float; --fallback float gives the same speed with FP32 accuracy",
                    config.target)
    target = target or AccuracyTarget()
    t0 = time.perf_counter()
    out_dir = prepare_output_dir(model, calib_data, output_dir, name)
    model = float_model_of(model, example_inputs, out_dir, name)
    prepared = prepare(model, name, example_inputs)
    check_node_names(prepared.model, config)
    for key in ("bias_correction", "adaround"):
        if getattr(config, key):
            log.warning("%s is not applied by the accuracy-target search (its layers are re-encoded trial by trial%s); "
                        "quantize without --target-metric/--evaluator to use it", key,
                        ", and a layer it keeps in float must keep its float weights" if key == "adaround" else "")
    # what the search runs, and so what its report says; weight ranges choose by it too (quant.encode: without bias
    # correction a Conv weight's MSE range counts each channel's coherent error)
    config = config.replace(bias_correction=False, adaround=False)
    config, calib_data, changed = transform(prepared, calib_data, config, calib_spec, max(64, sensitivity_samples))
    full, subs = plan_model(prepared, config)
    calib = calibrate(prepared, activation_tensors(full), calib_data, config, calib_spec)
    uncalibrated = calibrate_subgraphs(prepared, subs, calib, calib_data, config, calib_spec) if subs else []
    encode_model(prepared, full, subs, calib.observers, calib.methods, config)
    warn_float_subgraphs(full, config)
    layers = plan_layers(full, prepared.idx)
    # a body's layers whose tensors all went uncalibrated (a branch the data never takes) are in float already
    body_layers = {s.scope.path: [x for x in plan_layers(s.plan, s.idx, s.scope.path) if x.quantizers] for s in subs}
    searcher = Searcher(prepared, config, calib.observers, evaluate, target, methods=calib.methods,
                        uncalibrated=uncalibrated)
    timings = {"calibration_s": calib.seconds}

    providers = select_providers(config.providers)
    data = open_calibration(calib_data, prepared.inputs, config.batch_size, sensitivity_samples, calib_spec)
    batches = list(data)
    anchors = [prepared.model.graph.node[prepared.idx.order[layer.nodes[0]]] for layer in layers]
    needed = {t for n in anchors for t in (n.input[0], n.output[0])}  # what the MAC counts read
    if ranking == "single-op":  # it also feeds every layer its captured float inputs
        needed |= {t for layer in layers for t in layer.inputs}
    captured = capture(prepared.model, sorted(needed), batches if ranking == "single-op" else batches[:1], providers)
    costs = layer_macs(prepared.idx, layers, captured[0]) if captured else {}
    for s in subs:  # no captured values inside bodies: MACs estimated from static shapes
        costs.update(layer_macs(s.idx, body_layers[s.scope.path], {}))

    def rank() -> list[LayerScore]:
        t = time.perf_counter()
        scores = []
        if ranking == "single-op":
            scores = single_op_sensitivity(prepared.model, prepared.idx, full, layers, captured, providers)
        # propagated; also for body layers under single-op: their float inputs cannot be captured
        owned = owned_quantizers(prepared.model, prepared.idx, config, full, layers) if ranking != "single-op" else {}
        for s in subs:
            owned.update(owned_quantizers(s.model, s.idx, config, s.plan, body_layers[s.scope.path]))
        scored = (layers if ranking != "single-op" else []) + [x for s in subs for x in body_layers[s.scope.path]]
        if scored:
            scores += propagated_sensitivity(prepared.model, full, scored, batches, providers,
                                             getattr(evaluate, "output_names", None), owned)
        timings["sensitivity_s"] = time.perf_counter() - t
        return rank_scores(scores)

    scores: list[LayerScore] | Callable[[], list[LayerScore]] = rank
    if ranking == "end-to-end":  # full evaluations of its own, before the search's
        t = time.perf_counter()
        all_layers = {layer.name: layer for layer in layers + [x for s in subs for x in body_layers[s.scope.path]]}

        def only(layer: Layer) -> float:
            _, qdq = searcher.build([other for n, other in all_layers.items() if n != layer.name])
            return searcher.measure(qdq, f"only {layer.name} quantized", []).metric

        scores = end_to_end_sensitivity(list(all_layers.values()), only)
        searcher.trials.clear()
        timings["sensitivity_s"] = time.perf_counter() - t

    outcome = fallback_search(searcher, scores, strategy, fallback, costs, give_back_layers)
    captured.clear()  # the float values of the sensitivity samples: memory back before writing
    timings["search_s"] = outcome.seconds - (timings.get("sensitivity_s", 0.0) if ranking != "end-to-end" else 0.0)
    search_report = {"target": target.describe(), "ranking_kind": ranking, "ranking_why": RANKINGS[ranking],
                     "subgraph_layers": {path: [x.name for x in ls] for path, ls in body_layers.items() if ls},
                     "sensitivity_samples": sum(len(next(iter(b.values()))) for b in batches),
                     **outcome.to_dict()}
    if latency and batches:
        t = time.perf_counter()
        feed = first_sample(batches[0])
        lat = {"fp32_ms": measure_latency(prepared.model, feed, latency_runs),
               "all_int8_ms": measure_latency(outcome.all_quantized, feed, latency_runs)
               if outcome.all_quantized is not None else None,
               "final_ms": measure_latency(outcome.qdq, feed, latency_runs)}
        lat["final_vs_fp32"] = round(lat["final_ms"] / lat["fp32_ms"], 3)
        if lat["all_int8_ms"]:
            lat["all_int8_vs_fp32"] = round(lat["all_int8_ms"] / lat["fp32_ms"], 3)
        lat.update({"batch": 1, "runs": latency_runs, "runtime": "onnxruntime CPU, all graph optimizations"})
        search_report["latency"] = lat
        timings["latency_s"] = time.perf_counter() - t
    fraction = outcome.float_fraction()
    if outcome.met and fraction > FLOAT_FRACTION_WARNING:
        log.warning("the target holds with %.0f%% of the compute layers in %s: the model is barely quantized; try "
                    "a different --calib-method, --ranking end-to-end, or relax the target", 100 * fraction,
                    outcome.fallback)
    result = finish(prepared, outcome.plan, outcome.qdq, config, calib, out_dir, timings, t0,
                    extra_report={"search": search_report, **changed})
    names = [s.name for s in outcome.fallback_layers]
    kept = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "none"
    if not outcome.met:
        raise TargetNotMetError(
            f"accuracy target not met ({target.describe()}): FP32 {outcome.baseline:.4f}, best quantized "
            f"{max(t.metric for t in outcome.trials if t.label != 'fp32'):.4f}, threshold {outcome.threshold:.4f}; "
            f"the best model found was written to {result.model_path}",
            "relax the target, add calibration data, try --calib-method percentile, or --fallback to more layers")
    if max_float_fraction is not None and fraction > max_float_fraction + 1e-12:
        raise TooMuchFloatError(
            f"the accuracy target holds only with {fraction:.0%} of the compute layers in {outcome.fallback} "
            f"(--max-float-fraction {max_float_fraction:g}): {kept}; the model was written to {result.model_path}",
            "relax the target, try --calib-method percentile or mse, or allow more float with --max-float-fraction")
    n = len(outcome.fallback_layers)
    log.info("target met %s after %d full evaluation%s",
             f"with {n} layer{'' if n == 1 else 's'} in {outcome.fallback} ({kept})" if n else "with every layer quantized",
             len(outcome.trials), "" if len(outcome.trials) == 1 else "s")
    return result
