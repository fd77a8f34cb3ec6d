"""Automatic fallback to an accuracy target (after AMCT's accuracy-based auto calibration).

1. Quantize everything (one calibration pass; the observers are kept).
2. Evaluate the float model (the baseline) and the fully quantized one. Done if the target holds.
3. Rank layers by single-op sensitivity (worst first), then let a strategy choose how many of the
   worst to keep in float; each try edits the QuantPlan (``exclude_nodes``), never the graph, and
   re-renders from the same observers, so a try costs one render and one evaluation, no calibration.
4. Write the model that met the target, or, if none did, the best one found, with every evaluation
   in the report; an unmet target raises :class:`TargetNotMetError` *after* writing.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from tqdm import tqdm

from ..calib.readers import open_calibration
from ..calib.runner import select_providers
from ..config import QuantConfig
from ..errors import EXIT_CHECK_FAILED, UserError
from ..graph.model_io import ensure_writable_dir, save_model
from ..pipeline import Prepared, QuantResult, calibrate, finish, prepare
from ..quant.encode import activation_tensors, compute_encodings
from ..quant.layers import Layer, plan_layers
from ..quant.plan import QuantPlan, build_plan
from ..quant.qdq import render_qdq
from .evaluate import AccuracyTarget, Evaluator
from .sensitivity import LayerScore, capture, end_to_end_sensitivity, single_op_sensitivity
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
        plan = build_plan(self.prepared.model, config, self.prepared.idx)
        compute_encodings(plan, self.prepared.idx, self.observers, self.methods or self.config.calib_method,
                          self.config)
        return plan, render_qdq(self.prepared.model, plan.encodings)

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

    def to_dict(self) -> dict[str, Any]:
        final = next((t for t in reversed(self.trials) if t.float_layers == [s.name for s in self.fallback_layers]), None)
        return {
            "met": self.met,
            "strategy": self.strategy,
            "fallback": self.fallback,
            "baseline_metric": self.baseline,
            "threshold": self.threshold,
            "final_metric": final.metric if final else None,
            "full_evaluations": len(self.trials),
            "fallback_layers": [s.to_dict() for s in self.fallback_layers],
            "evaluations": [t.to_dict() for t in self.trials],
            "ranking": [s.to_dict() for s in self.ranking],
            "seconds": round(self.seconds, 3),
        }


def fallback_search(searcher: Searcher, ranking: list[LayerScore], strategy: str = "bisect",
                    fallback: str = "float") -> SearchOutcome:
    """``fallback="int16"`` first tries the ranked layers at 16 bits; if even all of them at 16 bits miss
    the target, the search keeps layers in float instead."""
    t0 = time.perf_counter()
    searcher.baseline = searcher.measure(searcher.prepared.model, "fp32", []).metric
    threshold = searcher.target.threshold(searcher.baseline)
    results: dict[tuple[str, int], tuple[Trial, QuantPlan, onnx.ModelProto]] = {}
    mode = "float"

    def attempt(k: int) -> bool:
        plan, qdq = searcher.build(ranking[:k], mode)
        trial = searcher.measure(qdq, f"{k} layers in {mode}", [s.name for s in ranking[:k]])
        results[(mode if k else "none", k)] = (trial, plan, qdq)
        return trial.passed

    chooser = STRATEGIES[strategy](len(ranking))
    with tqdm(total=None, desc=f"fallback search ({strategy})", unit="eval", disable=None, leave=False) as bar:
        ok = attempt(0)
        bar.update(1)
        if not ok and fallback == "int16" and ranking:
            mode = "int16"
            if not attempt(len(ranking)):  # even every layer at 16 bits misses the target: use float
                mode = "float"
            bar.update(1)
        while not ok and not chooser.done:
            chooser.step(attempt(chooser.current))
            bar.update(1)
            bar.set_postfix(layers=chooser.current, best=max(t.metric for t, _, _ in results.values()))
    k = 0 if ok else chooser.result
    key = (mode if k else "none", k)
    if key not in results:
        attempt(k)
    trial, plan, qdq = results[key]
    if not trial.passed:  # not even this met it: keep the best model seen (fewest layers on a tie)
        key = max(results, key=lambda m_k: (results[m_k][0].metric, -m_k[1]))
        trial, plan, qdq = results[key]
    mode, k = key
    return SearchOutcome(trial.passed, searcher.baseline, threshold, plan, qdq, ranking[:k], ranking,
                         list(searcher.trials), strategy, time.perf_counter() - t0, mode)


def auto_quantize(model: Any, calib_data: Any, evaluate: Evaluator, target: AccuracyTarget | None = None,
                  config: QuantConfig | None = None, output_dir: str | Path = "out", name: str | None = None,
                  strategy: str = "bisect", sensitivity_samples: int = 8, ranking: str = "single-op",
                  fallback: str = "float",
                  calib_spec: str | Path | None = None, example_inputs: Any = None) -> QuantResult:
    """Quantize, then keep the most sensitive layers in float until ``target`` holds.

    ``evaluate(model_path) -> float`` scores a model (higher is better), e.g. a
    :class:`~converter.search.evaluate.BuiltinEvaluator`. Raises :class:`TargetNotMetError` when no
    tried model meets the target; the best model found and the report are written first.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    if fallback not in ("float", "int16"):
        raise UserError(f"unknown fallback {fallback!r}", "use float or int16")
    config = config or QuantConfig()
    target = target or AccuracyTarget()
    t0 = time.perf_counter()
    out_dir = ensure_writable_dir(output_dir)
    prepared = prepare(model, name, example_inputs)
    full = build_plan(prepared.model, config, prepared.idx)
    calib = calibrate(prepared, activation_tensors(full), calib_data, config, calib_spec)
    compute_encodings(full, prepared.idx, calib.observers, calib.methods, config)
    layers = plan_layers(full, prepared.idx)
    searcher = Searcher(prepared, config, calib.observers, evaluate, target, methods=calib.methods)
    timings = {"calibration_s": calib.seconds}

    t = time.perf_counter()
    if ranking == "end-to-end":
        all_layers = {layer.name: layer for layer in layers}

        def only(layer: Layer) -> float:
            _, qdq = searcher.build([other for n, other in all_layers.items() if n != layer.name])
            return searcher.measure(qdq, f"only {layer.name} quantized", []).metric

        scores = end_to_end_sensitivity(layers, only)
        searcher.trials.clear()
    else:
        providers = select_providers(config.providers)
        data = open_calibration(calib_data, prepared.inputs, config.batch_size, sensitivity_samples, calib_spec)
        needed = sorted({t for layer in layers for t in layer.inputs})
        captured = capture(prepared.model, needed, data, providers)
        scores = single_op_sensitivity(prepared.model, prepared.idx, full, layers, captured, providers)
    timings["sensitivity_s"] = time.perf_counter() - t

    outcome = fallback_search(searcher, scores, strategy, fallback)
    timings["search_s"] = outcome.seconds
    search_report = {"target": target.describe(), "ranking_kind": ranking, **outcome.to_dict()}
    result = finish(prepared, outcome.plan, outcome.qdq, config, calib, out_dir, timings, t0,
                    extra_report={"search": search_report})
    names = [s.name for s in outcome.fallback_layers]
    kept = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "none"
    if not outcome.met:
        raise TargetNotMetError(
            f"accuracy target not met ({target.describe()}): FP32 {outcome.baseline:.4f}, best quantized "
            f"{max(t.metric for t in outcome.trials if t.label != 'fp32'):.4f}, threshold {outcome.threshold:.4f}; "
            f"the best model found was written to {result.model_path}",
            "relax the target, add calibration data, try --calib-method percentile, or --fallback to more layers")
    log.info("target met with %d layer(s) in float (%s) after %d full evaluations", len(outcome.fallback_layers), kept,
             len(outcome.trials))
    return result
