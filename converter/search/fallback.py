"""Automatic fallback to an accuracy target (after AMCT's accuracy-based auto calibration).

1. Quantize everything (one calibration pass, plus one for the tensors inside If/Loop/Scan bodies;
   the observers are kept).
2. Evaluate the float model (the baseline) and the fully quantized one. Done if the target holds.
3. Rank layers by single-op sensitivity (worst first), then let a strategy choose how many of the
   worst to keep in float; each try edits the QuantPlan (``exclude_nodes``, or ``exclude_with_inputs``: see
   *float form* below), never the graph, and
   re-renders from the same observers, so a try costs one render and one evaluation, no calibration.
   Layers inside If/Loop/Scan bodies are layers like the others (node names are unique model-wide): a
   try plans, encodes and renders the main graph and every body the way ``quantize`` does
   (:func:`~converter.pipeline.plan_model`, :func:`~converter.pipeline.encode_model`,
   :func:`~converter.quant.control_flow.render_control_flow`).
4. Write the model that met the target, or, if none did, the best one found, with every evaluation
   in the report; an unmet target raises :class:`TargetNotMetError` *after* writing.

The search knows when to stop:

* **budget**: at most ``max_evaluations`` full evaluations (FP32 and all-INT8 included; default
  ``2 + 4 ceil(log2 L)`` for ``L`` ranked layers); when it ends the search, the best model so far is kept
  and the report (``budget_exhausted``, ``stop_reason: budget``) and the error say so.
* **counted**: every model run, by kind: full evaluations (the end-to-end ranking's too), evaluations on
  an item subset (the subset ranking) and the ranking's runs on the sensitivity samples
  (``evaluation_counts``).
* **latency**: a model that meets the target but runs slower than ``max_latency_ratio`` x FP32 (ONNX
  Runtime CPU, batch 1; default 1.0 on ort-cpu for a model whose FP32 run takes at least
  :data:`LATENCY_GATE_MIN_MS`) is no success: another model that met the target within
  the limit is kept if one was evaluated, else the run ends not met (exit 1) with the accuracy/latency
  trade-offs found (``pareto``: FP32, then every evaluated model no other beats on both metric and latency).
* **float form** (:data:`FLOAT_FORMS`, :meth:`Searcher.reads_float_inputs`): on ort-cpu a float layer reads its
  inputs in float (``exclude_with_inputs``, what the ranking measured) only where ONNX Runtime then runs no other
  layer in float (a MatMul producer stays MatMulIntegerToFloat); where its Conv producer would run in float too,
  it keeps its neighbours quantized (``exclude_nodes``: it reads its quantized input through a DQ), so one float
  layer is one float layer as ORT runs it. Only when no float set of that form meets the target does the search
  try again with every float layer reading its inputs in float. The report's ``float_form`` says which form the
  chosen model uses (``auto`` or ``with-inputs``).
* **16 bits or float per layer** (``fallback="int16"``, the default on a target that runs 16 bits): the
  layers that had to go to float are tried at 16 bits again, group by group, so only those 16 bits cannot
  hold stay float.
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
from onnx import numpy_helper

from ..progress import tqdm

from ..calib.readers import one_sample, open_calibration
from ..calib.runner import capture
from ..config import QuantConfig, SearchConfig
from ..errors import EXIT_CHECK_FAILED, UserError
from ..graph.model_io import removes_created_dirs, save_model, small_bytes
from ..ort_session import runtime_layers, select_providers, use_custom_op_libraries
from ..pipeline import (Prepared, QuantResult, check_node_names, finish, float_model_of, prepare, prepare_output_dir,
                        kept_edits, quantize, render_plan, run_flow)
from ..quant.layers import Layer, owned_quantizers, plan_layers
from ..quant.plan import QuantPlan
from .evaluate import AccuracyTarget, Evaluator
from .sensitivity import (LayerScore, end_to_end_sensitivity, propagated_sensitivity, single_op_sensitivity,
                          subset_sensitivity)
from .sensitivity import rank as rank_scores
from .cost import COMPUTE_OPS, LayerCosts, layer_macs, measure_latency, runtime_costs, set_cost
from .giveback import give_back
from .speed import FLOAT_FRACTION_WARNING, float_where_faster
from .strategies import STRATEGIES

log = logging.getLogger("converter")


# the search's float forms (Searcher.float_form), tried in this order: "auto" reads a float layer's inputs in float
# (exclude_with_inputs) where ONNX Runtime then runs no other layer in float, else keeps them quantized
# (exclude_nodes: its neighbours stay quantized); "with-inputs" reads every float layer's inputs in float
FLOAT_FORMS = ("auto", "with-inputs")


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
    int16_layers: list[str] = field(default_factory=list)
    float_form: str = ""  # how its float layers read their inputs (FLOAT_FORMS); "" without float layers

    def to_dict(self) -> dict[str, Any]:
        d = {"label": self.label, "float_layers": self.float_layers, "metric": self.metric,
             "passed": self.passed, "seconds": round(self.seconds, 3)}
        if self.int16_layers:
            d["int16_layers"] = self.int16_layers
        if self.float_form:
            d["float_form"] = self.float_form
        return d


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
    # weight/bias values the techniques wrote (bias correction, AdaRound) on the fully quantized model: a try keeps
    # those of the layers it quantizes, a layer kept in float reads its float values
    edits: dict[str, Any] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)
    baseline: float = float("nan")
    # every model run the search makes, beside the full evaluations in ``trials``: the ranking's own full
    # evaluations (end-to-end), evaluations on a subset of the evaluation items (subset ranking) and the
    # ranking's runs on the sensitivity samples (one per model: propagated, single-op)
    ranking_trials: list[Trial] = field(default_factory=list)
    subset_evaluations: int = 0
    ranking_runs: int = 0
    # how a float layer reads its inputs (FLOAT_FORMS): "auto" decides per layer (form_of), "with-inputs" in float
    float_form: str = "auto"
    _forms: dict[str, bool] = field(default_factory=dict)  # layer -> reads its inputs in float under "auto"
    _tmp: tempfile.TemporaryDirectory = field(default_factory=tempfile.TemporaryDirectory)

    def build(self, layers: list[LayerScore] | list[Layer], mode: str = "float",
              int16: list[LayerScore] | list[Layer] = ()) -> tuple[QuantPlan, onnx.ModelProto]:
        """The plan and QDQ model with ``layers`` kept in float (``mode="float"``) or at 16 bits; ``int16``:
        more layers at 16 bits beside float ``layers`` (a per-layer choice of float or 16 bits)."""
        if mode == "int16":
            layers, int16 = [], list(layers) + list(int16)
        names = tuple(n for layer in layers for n in layer.nodes)
        with_inputs = tuple(n for layer in layers if self.reads_float_inputs(layer) for n in layer.nodes)
        config = self.config.replace(exclude_with_inputs=tuple(self.config.exclude_with_inputs) + with_inputs,
                                     exclude_nodes=tuple(self.config.exclude_nodes)
                                     + tuple(n for n in names if n not in with_inputs))
        if int16:
            config = config.replace(int16_nodes=tuple(self.config.int16_nodes) + tuple(l.name for l in int16))
        return self._render(config, names)

    def _render(self, config: QuantConfig, names: tuple[str, ...] = ()) -> tuple[QuantPlan, onnx.ModelProto]:
        """Plan ``config`` on the prepared model, encode it from the search's observers (with the techniques' edits
        of what it quantizes) and render the QDQ model: one try costs a render, no calibration."""
        return render_plan(self.prepared, config, self.observers, self.methods, self.uncalibrated, self.edits,
                           names[:3], base=self.config)

    def reads_float_inputs(self, layer: LayerScore | Layer) -> bool:
        """Whether float ``layer`` reads its inputs in float (``exclude_with_inputs``: the ranking measured that, it
        recovers the most) rather than through the DQ of its quantized input (``exclude_nodes``). Under form "auto"
        it does so only where ONNX Runtime CPU then runs no other layer in float (:func:`runtime_layers` of the
        model with that layer alone in float; a MatMul producer stays MatMulIntegerToFloat, a Conv producer would run
        in float): one float layer is one float layer as ORT runs it. Elsewhere (another target, layers inside
        If/Loop/Scan bodies, which the accounting cannot see) it reads them in float."""
        if self.float_form == "with-inputs":
            return True
        if layer.name in self._forms:
            return self._forms[layer.name]
        if self.config.target != "ort-cpu" or layer.name not in self.prepared.idx.order \
                or any(a.type == onnx.AttributeProto.GRAPH for n in self.prepared.model.graph.node for a in n.attribute):
            self._forms[layer.name] = True
        else:
            config = self.config.replace(exclude_with_inputs=tuple(self.config.exclude_with_inputs) + tuple(layer.nodes))
            _, qdq = self._render(config, tuple(layer.nodes))
            data = small_bytes(qdq)
            try:
                run = runtime_layers(qdq, data) if data is not None else None
            except Exception as exc:  # noqa: BLE001 - no accounting: keep the neighbours quantized
                log.debug("no runtime accounting for %s: %s", layer.name, exc)
                run = None
            extra = sorted(set(run.float_layers) - set(layer.nodes)) if run is not None else ["?"]
            self._forms[layer.name] = not extra
            if extra:
                log.debug("%s keeps its quantized inputs: reading them in float would run %s in float too",
                          layer.name, extra)
        return self._forms[layer.name]

    def kept_edits(self, plan: QuantPlan) -> dict[str, Any]:
        """The techniques' edits of the tensors ``plan`` quantizes (weights and biases of its quantized layers)."""
        return kept_edits(self.edits, plan)

    def measure(self, model: onnx.ModelProto, label: str, float_layers: list[str],
                int16_layers: list[str] | None = None) -> Trial:
        path = self.save(model)
        t = time.perf_counter()
        metric = float(self.evaluate(str(path)))
        trial = Trial(label, float_layers, metric, self.target.met(metric, self.baseline) if label != "fp32" else True,
                      time.perf_counter() - t, list(int16_layers or []))
        self.trials.append(trial)
        log.debug("%s: metric %.6f (%s)", label, metric, "pass" if trial.passed else "fail")
        return trial

    def save(self, model: onnx.ModelProto) -> Path:
        path = Path(self._tmp.name) / "candidate.onnx"
        save_model(model, path)
        return path

    def counts(self) -> dict[str, int]:
        """Every model run of the search, by kind: full evaluations (the ranking's own included), evaluations
        on a subset of the evaluation items, and the ranking's runs on the sensitivity samples."""
        full = len(self.trials) + len(self.ranking_trials)
        return {"full": full, "ranking_full": len(self.ranking_trials), "subset": self.subset_evaluations,
                "ranking_runs": self.ranking_runs, "total": full + self.subset_evaluations + self.ranking_runs}


def default_max_evaluations(layers: int) -> int:
    """The default budget of full evaluations (FP32 and all-INT8 included): ``2 + 4 ceil(log2 L)`` for ``L``
    ranked layers: room for gallop's ``2 ceil(log2 L) + 1`` and as many again for give-back."""
    return 2 + 4 * math.ceil(math.log2(max(layers, 2)))


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
    costs: dict[str, float] = field(default_factory=dict)  # layer -> MACs per sample, or ms (cost_kind)
    all_quantized: onnx.ModelProto | None = None
    int16_layers: list[str] = field(default_factory=list)  # of fallback_layers, those at 16 bits (the rest float)
    max_evaluations: int | None = None
    budget_exhausted: bool = False  # the evaluation budget ended the search
    counts: dict[str, int] = field(default_factory=dict)  # Searcher.counts()
    candidates: list[tuple[Trial, QuantPlan, onnx.ModelProto]] = field(default_factory=list)  # every model evaluated
    stop_reason: str = ""  # why the result is not met: "accuracy", "budget", "latency"
    macs: dict[str, float] = field(default_factory=dict)  # layer -> MACs per sample, when costs are not MACs
    cost_kind: str = "macs"  # macs | ort-cpu-ms (converter.search.cost.runtime_costs)
    float_form: str | None = None  # how the float layers read their inputs (FLOAT_FORMS); None: no float layer
    _runtime: Any = field(default=None, repr=False)

    def runtime(self) -> Any:
        """What ONNX Runtime CPU runs in float in the chosen model (:func:`converter.ort_session.runtime_layers`):
        target ort-cpu, main graph with no If/Loop/Scan bodies, under the protobuf limit; else None."""
        if self._runtime is None:
            self._runtime = False
            if self.plan.target == "ort-cpu" and self.fallback == "float" and not self.plan.float_subgraphs \
                    and not any(a.type == onnx.AttributeProto.GRAPH for n in self.qdq.graph.node for a in n.attribute):
                data = small_bytes(self.qdq)
                if data is not None:
                    try:
                        self._runtime = runtime_layers(self.qdq, data)
                    except Exception as exc:  # noqa: BLE001 - a report detail
                        log.debug("no runtime accounting of the search's model: %s", exc)
        return self._runtime or None

    def float_fraction(self) -> float:
        """Share of the compute layers (Conv, Gemm, MatMul) left in float (or 16 bits): as ONNX Runtime CPU's
        optimized graph runs them where it can tell (:meth:`runtime`), else as the search kept them."""
        run = self.runtime()
        if run is not None:
            return run.float_fraction
        compute = [s for s in self.ranking if s.op_type.split("+")[0] in COMPUTE_OPS]
        kept = {s.name for s in self.fallback_layers}
        return sum(s.name in kept for s in compute) / len(compute) if compute else 0.0

    def to_dict(self) -> dict[str, Any]:
        names = [s.name for s in self.fallback_layers]
        final = next((t for t in reversed(self.trials) if set(t.float_layers) | set(t.int16_layers) == set(names)
                      and t.label != "fp32"), None)
        macs = self.macs or (self.costs if self.cost_kind == "macs" else {})
        total = sum(macs.values())
        run = self.runtime()
        floats = list(run.float_layers) if run is not None else names
        cost = {} if self.cost_kind == "macs" else {"cost_kind": self.cost_kind,
                                                    "float_cost_ms": round(set_cost(self.costs, floats),
                                                                           3)}
        return {
            "met": self.met,
            "strategy": self.strategy,
            "fallback": self.fallback,
            "baseline_metric": self.baseline,
            "threshold": self.threshold,
            "final_metric": final.metric if final else None,
            "full_evaluations": self.counts.get("full", len(self.trials)),
            "evaluation_counts": self.counts,
            "max_evaluations": self.max_evaluations,
            "budget_exhausted": self.budget_exhausted,
            "stop_reason": self.stop_reason,
            "int16_layers": self.int16_layers,
            "strategy_prefix": self.prefix,
            "given_back": max(self.prefix - len(names), 0),
            "float_fraction": round(self.float_fraction(), 4),
            "float_mac_fraction": round(sum(macs.get(n, 0.0) for n in floats) / total, 4) if total else 0.0,
            "float_layers_runtime": floats if run is not None else None,  # what ORT CPU runs in float, by name
            "float_form": self.float_form,
            **cost,
            "fallback_layers": [self._layer(s, macs) for s in self.fallback_layers],
            "evaluations": [t.to_dict() for t in self.trials],
            "ranking": [self._layer(s, macs) for s in self.ranking],
            "seconds": round(self.seconds, 3),
        }


    def _layer(self, s: LayerScore, macs: dict[str, float]) -> dict[str, Any]:
        return {**s.to_dict(), "macs": macs.get(s.name),
                **({"cost_ms": self.costs.get(s.name)} if self.cost_kind != "macs" else {})}


def give_back_order(layers: list[LayerScore], costs: dict[str, float]) -> list[LayerScore]:
    """Cheapest to quantize back first: least damage (1 - cosine) per unit of cost gained (measured ms on ONNX
    Runtime CPU, :func:`converter.search.cost.runtime_costs`, or MACs), then the costliest first. With measured
    costs, a layer's gain is what quantizing it back saves with the others of ``layers`` in float (an island's
    inner layer saves less than alone: its neighbours keep the float edge)."""
    if getattr(costs, "set_cost", None) is not None:  # what quantizing each back saves with the others in float
        names = [s.name for s in layers]
        whole = set_cost(costs, names)
        costs = {n: round(whole - set_cost(costs, [m for m in names if m != n]), 2) for n in names}
    floor = max(costs.values(), default=0.0) * 1e-6 or 1e-12  # a layer that costs nothing: any damage ranks it last

    def key(s: LayerScore) -> tuple:
        damage = s.recovery if s.recovery is not None else \
            1.0 - s.cosine if s.cosine == s.cosine else 1.0 - (s.metric or 0.0)
        return (max(damage, 0.0) / max(costs.get(s.name, 0.0), floor), -costs.get(s.name, 0.0), s.name)
    return sorted(layers, key=key)


def fallback_search(searcher: Searcher, ranking: list[LayerScore] | Callable[[], list[LayerScore]],
                    strategy: str = "gallop",
                    fallback: str = "float", costs: dict[str, float] | Callable[[], dict[str, float]] | None = None,
                    give_back_layers: bool = True, max_evaluations: int | None = None) -> SearchOutcome:
    """Find the fewest, cheapest layers to keep in float (``fallback="int16"``: at 16 bits) for the target.

    1. the strategy finds the smallest prefix of ``ranking`` that meets it;
    2. give-back re-quantizes the layers of that prefix the target does not need (:mod:`.giveback`);
    3. with ``fallback="int16"``, when the layers had to go to float, each float layer is tried at 16 bits
       instead (group testing, as give-back): a per-layer choice of float or 16 bits;
    4. of every model that met the target, the one with the fewest MACs left in float is kept.

    ``ranking`` and ``costs`` may be functions computing them: they are then called only when the fully quantized
    model misses the target (profiling every layer's runtime cost is wasted on a model all-INT8 already meets). ``fallback="int16"`` first tries the ranked layers at 16 bits; if even all of them
    at 16 bits miss the target, the search keeps layers in float instead. ``max_evaluations`` bounds the
    full evaluations, FP32 and all-INT8 included (default :func:`default_max_evaluations` of the ranked
    layers); when it ends the search, the best model so far is kept and ``budget_exhausted`` says so.
    """
    t0 = time.perf_counter()
    costs = costs if costs is not None else {}
    searcher.baseline = searcher.measure(searcher.prepared.model, "fp32", []).metric
    threshold = searcher.target.threshold(searcher.baseline)
    # (float layers, 16-bit layers, float form) -> (trial, plan, model, float LayerScores, 16-bit LayerScores)
    results: dict[tuple[frozenset, frozenset, str], tuple[Trial, QuantPlan, onnx.ModelProto, list, list]] = {}
    mode = "float"
    budget = {"max": max_evaluations, "exhausted": False}
    forms = list(FLOAT_FORMS[FLOAT_FORMS.index(searcher.float_form):])  # the searcher's form, then the next

    def key_of(floats: list, wide: list) -> tuple[frozenset, frozenset, str]:
        names = frozenset(s.name for s in floats)
        return names, frozenset(s.name for s in wide), searcher.float_form if names else ""

    def attempt(layers: list[LayerScore], label: str | None = None,
                int16: list[LayerScore] | tuple = ()) -> bool | None:
        """Whether the model with ``layers`` kept out of INT8 (in ``mode``; ``int16``: more at 16 bits) met the
        target; None when the budget is spent (nothing evaluated)."""
        floats, wide = (list(layers), list(int16)) if mode == "float" else ([], list(layers) + list(int16))
        key = key_of(floats, wide)
        if key not in results:
            if budget["max"] is not None and len(searcher.trials) >= budget["max"]:
                budget["exhausted"] = True
                return None
            plan, qdq = searcher.build(floats, "float", wide)
            what = f"{len(layers)} layers in {mode}" + (f", {len(int16)} at 16 bits" if int16 else "") + \
                (" (reading inputs in float)" if floats and searcher.float_form == "with-inputs" else "")
            trial = searcher.measure(qdq, label or what, [s.name for s in floats], [s.name for s in wide])
            trial.float_form = key[2]
            results[key] = (trial, plan, qdq, floats, wide)
        return results[key][0].passed

    def passes(layers: list[LayerScore]) -> bool:
        return bool(attempt(layers, f"give back: {len(layers)} layers in {mode}"))

    with tqdm(total=None, desc=f"fallback search ({strategy})", unit="eval", disable=None, leave=False) as bar:
        ok = attempt([])
        bar.update(1)
        if callable(ranking):
            ranking = [] if ok else ranking()
        if callable(costs):
            costs = {} if ok else costs()
        if budget["max"] is None:
            budget["max"] = default_max_evaluations(len(ranking))
        chooser = STRATEGIES[strategy](len(ranking))
        if not ok and fallback == "int16" and ranking:
            mode = "int16"
            if attempt(ranking) is False:  # even every layer at 16 bits misses the target: use float
                mode = "float"
            bar.update(1)
        for form in forms if mode == "float" else [searcher.float_form]:
            searcher.float_form = form
            chooser = STRATEGIES[strategy](len(ranking)) if form != forms[0] else chooser
            while not ok and not chooser.done:
                passed = attempt(ranking[:chooser.current])
                if passed is None:
                    break
                chooser.step(passed)
                bar.update(1)
                bar.set_postfix(layers=chooser.current, best=max(r[0].metric for r in results.values()))
            k = 0 if ok or budget["exhausted"] else chooser.result
            if k:
                attempt(ranking[:k])  # cached unless k is all n (assumed to pass); if it fails, the best seen is kept
            key_k = key_of(ranking[:k], []) if mode == "float" else key_of([], ranking[:k])
            if not k or budget["exhausted"] or (key_k in results and results[key_k][0].passed):
                break
            if form != forms[-1]:
                log.info("no float set whose layers keep their neighbours quantized meets the target; trying the "
                         "float layers reading their inputs in float (a Conv producer of such an input runs float too)")
        prefix = k
        if k > 1 and give_back_layers and key_k in results and results[key_k][0].passed:
            bar.set_description("give back")
            give_back(give_back_order(ranking[:k], costs), passes)
        best_float = _best(results, costs)
        if fallback == "int16" and mode == "float" and best_float is not None and results[best_float][3]:
            # the target runs 16 bits: of the float layers, those 16 bits are enough for go to 16 bits
            bar.set_description("16 bits per layer")
            kept = results[best_float][3]

            def float_enough(keep: list[LayerScore]) -> bool:
                wide = [s for s in kept if s not in keep]
                return bool(attempt(keep, f"{len(keep)} layers in float, {len(wide)} at 16 bits", wide))

            give_back(give_back_order(kept, costs), float_enough)
    key = _best(results, costs)
    if key is None:  # nothing met it: keep the best model seen (fewest layers on a tie)
        key = max(results, key=lambda kk: (results[kk][0].metric, -len(kk[0]) - len(kk[1])))
    trial, plan, qdq, floats, wide = results[key]
    searcher.float_form = key[2] or forms[0]
    order = {s.name: i for i, s in enumerate(ranking)}
    layers = sorted(floats + wide, key=lambda s: order[s.name])
    none = results.get((frozenset(), frozenset(), ""))
    kind = "mixed" if floats and wide else "int16" if wide else "float"
    return SearchOutcome(trial.passed, searcher.baseline, threshold, plan, qdq, layers, ranking,
                         list(searcher.trials), strategy, time.perf_counter() - t0, kind, prefix, costs.copy(),
                         none[2] if none else None, int16_layers=[s.name for s in layers if s.name in key[1]],
                         max_evaluations=budget["max"], budget_exhausted=budget["exhausted"],
                         counts=searcher.counts(), candidates=[(r[0], r[1], r[2]) for r in results.values()],
                         stop_reason="" if trial.passed else "budget" if budget["exhausted"] else "accuracy",
                         float_form=key[2] or None)


def _tradeoffs(outcome: SearchOutcome, float_model: onnx.ModelProto, feed: dict, lat: dict,
               runs: int) -> list[dict[str, Any]]:
    """Every evaluated model (FP32 included) with its metric and batch-1 latency: the final and all-INT8
    models' from ``lat``, the others measured here with ``runs`` runs."""
    rows = [{"label": "fp32", "float_layers": 0, "int16_layers": 0, "metric": outcome.baseline,
             "latency_ms": lat["fp32_ms"], "passed": True}]
    for trial, _, model in outcome.candidates:
        ms = lat["final_ms"] if model is outcome.qdq else lat["all_int8_ms"] if model is outcome.all_quantized \
            else None
        rows.append({"label": trial.label, "float_layers": len(trial.float_layers),
                     "int16_layers": len(trial.int16_layers), "metric": trial.metric,
                     "latency_ms": ms if ms is not None else measure_latency(model, feed, runs),
                     "passed": trial.passed, "names": trial.float_layers + trial.int16_layers})
    for r in rows:
        r["latency_ms"] = round(r["latency_ms"], 4)
        r["vs_fp32"] = round(r["latency_ms"] / lat["fp32_ms"], 3)
    return rows


def _best(results: dict, costs: dict[str, float]) -> tuple | None:
    """Of the models that met the target: the cheapest float set (MACs, or measured ms costed per island:
    :func:`converter.search.cost.set_cost`), then at 16 bits, then the fewest layers, then the best metric. None if
    none met it."""
    passed = [key for key, r in results.items() if r[0].passed]
    if not passed:
        return None
    return min(passed, key=lambda kk: (set_cost(costs, kk[0]), set_cost(costs, kk[1]),
                                       len(kk[0]) + len(kk[1]), -results[kk][0].metric, sorted(kk[0]), sorted(kk[1])))


def pareto(points: list[dict[str, Any]], cost: str = "latency_ms") -> list[dict[str, Any]]:
    """The points no other point beats on both ``metric`` (higher is better) and ``cost`` (lower is better),
    cheapest first: the accuracy/latency trade-offs found."""
    front = [p for p in points if not any(q is not p and q["metric"] >= p["metric"] and q[cost] <= p[cost]
                                          and (q["metric"] > p["metric"] or q[cost] < p[cost]) for q in points)]
    return sorted(front, key=lambda p: (p[cost], -p["metric"], p["label"]))


def pareto_table(rows: list[dict[str, Any]], threshold: float) -> str:
    """The trade-off table as printed on the terminal (and in the unmet-target message)."""
    lines = [f"  {'kept out of INT8':>16s} {'metric':>9s} {'target':>6s} {'latency':>9s} {'x FP32':>6s}"]
    for r in rows:
        kept = "FP32 model" if r["label"] == "fp32" else f"{r['float_layers']} float" + (
            f" {r['int16_layers']} int16" if r.get("int16_layers") else "")
        lines.append(f"  {kept:>16s} {r['metric']:9.4f} {'met' if r['metric'] >= threshold - 1e-12 else 'no':>6s} "
                     f"{r['latency_ms']:7.2f}ms {r['vs_fp32']:6.2f}")
    return "\n".join(lines)


def search_costs(searcher: Searcher, layers: list[Layer], subs: list, batches: list, macs: dict[str, float],
                 latency: bool, fallback: str) -> tuple[dict[str, float], dict[str, Any]]:
    """The search's cost per layer: on target ort-cpu (float fallback, a main graph without bodies, ``latency`` on),
    the milliseconds ONNX Runtime CPU measurably spends more with the layer in float (:func:`runtime_costs`: each
    compute layer alone in float, profiled against the all-INT8 model; other layers cost nothing there); else MACs.
    Returns the costs and what the report says about them ({} for MACs)."""
    if searcher.config.target != "ort-cpu" or fallback != "float" or subs or not latency or not batches:
        return macs, {}
    t = time.perf_counter()
    compute = [x for x in layers if x.op_type in COMPUTE_OPS]
    by_name = {x.name: x for x in compute}
    try:
        _, int8 = searcher.build([])
        measured = runtime_costs(int8, one_sample(batches[0], searcher.prepared.inputs), [x.name for x in compute],
                                 lambda names: searcher.build([by_name[n] for n in names])[1],
                                 threads=searcher.config.threads)
    except Exception as exc:  # noqa: BLE001 - profiling is an optimisation of the search, never its failure
        log.warning("could not profile the layers on ONNX Runtime CPU (%s: %s); the search costs layers by MACs",
                    type(exc).__name__, exc)
        return macs, {}
    costs = LayerCosts({x.name: 0.0 for x in layers}, measured)
    costs.update(measured.costs())
    log.info("costed %d compute layers on ONNX Runtime CPU in %.1f s (all-INT8 %.2f ms profiled; costliest in "
             "float: %s)", len(compute), time.perf_counter() - t, measured.int8_ms,
             ", ".join(f"{n} +{c:.2f} ms" for n, c in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0]))[:3]))
    return costs, {**measured.to_dict(), "layers": len(compute), "seconds": time.perf_counter() - t}


RANKINGS = {
    "propagated": "each layer alone quantized, the whole model run on the sensitivity samples and its outputs "
                  "compared with FP32: the error a layer causes after every layer behind it (default)",
    "single-op": "each layer alone quantized, fed the float inputs, its own output compared (AMCT): no "
                 "propagation, cheapest, misses layers whose error later layers amplify",
    "end-to-end": "each layer alone quantized, the user's metric on the whole evaluation set (AIMET): one full "
                  "evaluation per layer",
    "subset": "each layer alone in float, the user's metric on the evaluation items the all-INT8 model changed "
              "most (NNCF): one run on a few hundred items per layer; needs a built-in --target-metric",
}
FALLBACKS = ("auto", "float", "int16")
# the default latency gate (1.0x FP32 on ort-cpu) needs an FP32 run of at least this long: below it ONNX Runtime's
# per-call overhead, not the arithmetic, sets the time (a 20 us model is "slower" quantized by a few us of Q/DQ
# dispatch); an explicit max_latency_ratio gates any model. 0.05 ms: ResNet-8 (CIFAR, 0.13 ms FP32 with 2 threads)
# is gated, so its search cannot return a model 2x slower than FP32 as success; the digits CNN (0.02 ms) is not
LATENCY_GATE_MIN_MS = 0.05


class TooMuchFloatError(TargetNotMetError):
    """The target was met, but with more of the model in float than ``max_float_fraction`` allows."""


@removes_created_dirs
def auto_quantize(model: Any, calib_data: Any, evaluate: Evaluator, target: AccuracyTarget | None = None,
                  config: QuantConfig | None = None, output_dir: str | Path | None = None, name: str | None = None,
                  strategy: str = "gallop", sensitivity_samples: int = 8, ranking: str = "propagated",
                  fallback: str = "auto", calib_spec: str | Path | None = None, example_inputs: Any = None,
                  give_back_layers: bool = True, max_float_fraction: float | None = None,
                  latency: bool = True, latency_runs: int = 20, max_evaluations: int | None = None,
                  max_latency_ratio: float | None = None, *, image_spec: str | Path | None = None) -> QuantResult:
    """Quantize, then keep the fewest, cheapest layers in float until ``target`` holds.

    ``evaluate(model_path) -> float`` scores a model (higher is better), e.g. a
    :class:`~converter.search.evaluate.BuiltinEvaluator`. ``ranking``: ``propagated`` (default),
    ``single-op`` or ``end-to-end`` (see :data:`RANKINGS`). ``fallback``: ``float``, ``int16`` (16-bit
    activations before float) or ``auto`` (int16 where the target runs 16 bits fast: qnn; float elsewhere).
    Raises :class:`TargetNotMetError` when no tried model meets the target, and :class:`TooMuchFloatError`
    when it is met with more than ``max_float_fraction`` of the compute layers in float; the best model
    found and the report are written first.

    ``max_evaluations``: the budget of full evaluations (FP32 and all-INT8 included; default
    :func:`default_max_evaluations`); the end-to-end ranking's evaluations come on top and are counted.
    A model that meets the target but runs slower than ``max_latency_ratio`` x FP32 (measured on ONNX
    Runtime CPU, batch 1; unset: ``config.max_latency_ratio``, else 1.0 on target ort-cpu when the FP32 run takes
    >= 0.05 ms, none on targets this machine does not run) is not a success either: the report
    (``search.pareto``) and the error list the accuracy/latency trade-offs found.
    """
    config = config or QuantConfig()
    if max_latency_ratio is None and latency:
        max_latency_ratio = config.max_latency_ratio
    _check_options(strategy, ranking, fallback, max_evaluations, max_latency_ratio, latency, max_float_fraction)
    use_custom_op_libraries(config.custom_op_libraries)
    calib_spec = image_spec or calib_spec  # one spelling with quantize and verify; calib_spec: the old one
    fallback = _resolve_fallback(fallback, config)
    target = target or AccuracyTarget()
    t0 = time.perf_counter()
    # 1. quantize everything once (the observers kept)
    run = _quantize_all(model, calib_data, evaluate, target, config, output_dir, name, example_inputs, calib_spec,
                        sensitivity_samples)
    config, searcher = run.config, run.searcher
    _capture_costs(run, ranking, sensitivity_samples, calib_spec)
    if ranking == "subset" and not hasattr(evaluate, "worst_items"):
        log.warning("--ranking subset needs a built-in --target-metric (it scores single evaluation items); "
                    "the custom evaluator scores whole sets, so the ranking is propagated")
        ranking = "propagated"
    # 2.-3. evaluate FP32 and all-INT8, rank the layers, let the strategy choose the float set
    scores = _ranking(run, ranking, evaluate)
    cost_info: dict[str, Any] = {}

    def costs() -> dict[str, float]:  # only where all-INT8 misses the target (fallback_search calls it then)
        found, info = search_costs(searcher, run.layers, run.subs, run.batches, run.costs, latency, fallback)
        cost_info.update(info)
        return found

    outcome = fallback_search(searcher, scores, strategy, fallback, costs, give_back_layers, max_evaluations)
    if cost_info:
        run.timings["runtime_costs_s"] = cost_info.pop("seconds")
    outcome.macs, outcome.cost_kind = run.costs, cost_info.get("kind", "macs")
    run.captured.clear()  # the float values of the sensitivity samples: memory back before writing
    run.timings["search_s"] = outcome.seconds - (run.timings.get("sensitivity_s", 0.0)
                                                 if ranking != "end-to-end" else 0.0)
    search_report = {"target": target.describe(), "ranking_kind": ranking, "ranking_why": RANKINGS[ranking],
                     **({"runtime_costs": cost_info} if cost_info else {}),
                     "subgraph_layers": {path: [x.name for x in ls] for path, ls in run.body_layers.items() if ls},
                     "sensitivity_samples": sum(len(next(iter(b.values()))) for b in run.batches),
                     **outcome.to_dict()}
    if latency and run.batches:
        _latency_gate(run, outcome, search_report, latency_runs, max_latency_ratio)
    # 4. write the model that met the target (or the best found), then say why not where it was not met
    fraction = outcome.float_fraction()
    if outcome.met and fraction > FLOAT_FRACTION_WARNING:
        log.warning("the target holds with %.0f%% of the compute layers in %s: the model is barely quantized; try "
                    "a different --calib-method, --ranking end-to-end, or relax the target", 100 * fraction,
                    outcome.fallback)
    result = _write(run, outcome, search_report, calib_spec, t0)
    _raise_unless_met(outcome, search_report, target, result, max_float_fraction, fraction)
    return result


def _check_options(strategy: str, ranking: str, fallback: str, max_evaluations: int | None,
                   max_latency_ratio: float | None, latency: bool, max_float_fraction: float | None) -> None:
    """The search's settings, before any work."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    if ranking not in RANKINGS:
        raise UserError(f"unknown ranking {ranking!r}", f"use one of {', '.join(RANKINGS)}")
    if fallback not in FALLBACKS:
        raise UserError(f"unknown fallback {fallback!r}", f"use one of {', '.join(FALLBACKS)}")
    if max_evaluations is not None and max_evaluations < 2:
        raise UserError(f"max_evaluations must be at least 2 (FP32 and all-INT8), got {max_evaluations}",
                        "use e.g. --max-evaluations 20, or leave it out for the default (2 + 4 log2 layers)")
    if max_latency_ratio is not None and not max_latency_ratio > 0:
        raise UserError(f"max_latency_ratio must be > 0, got {max_latency_ratio}",
                        "use e.g. --max-latency-ratio 0.8 (at most 0.8x the FP32 latency)")
    if max_latency_ratio is not None and not latency:
        raise UserError("max_latency_ratio needs the latency measured", "drop latency=False, or max_latency_ratio")
    if max_float_fraction is not None and not 0.0 <= max_float_fraction <= 1.0:
        raise UserError(f"max_float_fraction must be in [0, 1], got {max_float_fraction}",
                        "use e.g. --max-float-fraction 0.1 (at most 10% of the compute layers in float)")


def _resolve_fallback(fallback: str, config: QuantConfig) -> str:
    """``auto``: int16 where the target runs 16 bits fast (qnn), float elsewhere."""
    if fallback == "auto":
        return "int16" if config.target == "qnn" else "float"
    if fallback == "int16" and config.target != "qnn":
        log.warning("fallback int16 on target %s: ONNX Runtime CPU has no fast 16-bit kernels, so a 16-bit layer "
                    "runs no faster than float; --fallback float gives the same speed with FP32 accuracy",
                    config.target)
    return fallback


@dataclass
class _SearchRun:
    """What the steps of :func:`auto_quantize` share."""

    out_dir: Path
    prepared: Prepared
    config: QuantConfig
    calib_data: Any
    changed: dict
    full: QuantPlan
    subs: list
    calib: Any
    edits: dict
    layers: list[Layer]
    body_layers: dict[str, list[Layer]]
    searcher: Searcher
    timings: dict[str, float]
    batches: list = field(default_factory=list)
    captured: list = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)
    providers: Any = None

    def all_layers(self) -> list[Layer]:
        return self.layers + [x for s in self.subs for x in self.body_layers[s.scope.path]]


def _quantize_all(model: Any, calib_data: Any, evaluate: Evaluator, target: AccuracyTarget, config: QuantConfig,
                  output_dir: Any, name: str | None, example_inputs: Any, calib_spec: Any,
                  sensitivity_samples: int) -> _SearchRun:
    """Step 1: the one flow (converter.pipeline.run_flow), with the techniques the search may use: the
    float-stage ones, and bias correction / AdaRound run once on the fully quantized model; each trial keeps their
    weight/bias edits for the layers it quantizes and drops them for the layers it keeps in float
    (Searcher.build)."""
    out_dir = prepare_output_dir(model, calib_data, output_dir, name)
    model = float_model_of(model, example_inputs, out_dir, name)
    prepared = prepare(model, name, example_inputs)
    check_node_names(prepared.model, config)
    run_flow(prepared, calib_data, config, calib_spec, keep=max(64, sensitivity_samples), searchable_only=True)
    config, calib_data, changed = prepared.config, prepared.calib_data, dict(prepared.entries)
    full, subs, calib = prepared.plan, prepared.subs, prepared.calib
    uncalibrated = prepared.provided["uncalibrated"]
    edits = prepared.take_edits()  # the model is the float model again (the FP32 baseline, the ranking)
    layers = plan_layers(full, prepared.idx)
    # a body's layers whose tensors all went uncalibrated (a branch the data never takes) are in float already
    body_layers = {s.scope.path: [x for x in plan_layers(s.plan, s.idx, s.scope.path) if x.quantizers] for s in subs}
    searcher = Searcher(prepared, config, calib.observers, evaluate, target, methods=calib.methods,
                        uncalibrated=uncalibrated, edits=edits)
    return _SearchRun(out_dir, prepared, config, calib_data, changed, full, subs, calib, edits, layers, body_layers,
                      searcher, {"calibration_s": calib.seconds})


def _capture_costs(run: _SearchRun, ranking: str, sensitivity_samples: int, calib_spec: Any) -> None:
    """The sensitivity samples, the float values the MAC counts (and the single-op ranking) read, the MACs."""
    prepared, layers = run.prepared, run.layers
    run.providers = select_providers(run.config.providers)
    data = open_calibration(run.calib_data, prepared.inputs, run.config.batch_size, sensitivity_samples, calib_spec)
    run.batches = list(data)
    anchors = [prepared.model.graph.node[prepared.idx.order[layer.nodes[0]]] for layer in layers]
    needed = {t for n in anchors for t in (n.input[0], n.output[0])}  # what the MAC counts read
    if ranking == "single-op":  # it also feeds every layer its captured float inputs
        needed |= {t for layer in layers for t in layer.inputs}
    run.captured = capture(prepared.model, sorted(needed), run.batches if ranking == "single-op" else run.batches[:1],
                           run.providers)
    run.costs = layer_macs(prepared.idx, layers, run.captured[0]) if run.captured else {}
    for s in run.subs:  # no captured values inside bodies: MACs estimated from static shapes
        run.costs.update(layer_macs(s.idx, run.body_layers[s.scope.path], {}))


def _ranking(run: _SearchRun, ranking: str,
             evaluate: Evaluator) -> list[LayerScore] | Callable[[], list[LayerScore]]:
    """Step 3's ranking: a function the search calls after FP32 and all-INT8 are evaluated (or, for end-to-end,
    the scores of its own full evaluations, run now)."""
    searcher, prepared, timings = run.searcher, run.prepared, run.timings
    layers, subs, body_layers, config, full = run.layers, run.subs, run.body_layers, run.config, run.full

    def rank() -> list[LayerScore]:
        t = time.perf_counter()
        scores = []
        if ranking == "subset":  # the user's metric on the items the all-INT8 model (just evaluated) changed most
            sub = evaluate.subset(evaluate.worst_items(evaluate.last_outputs))

            def float_only(layer: Layer) -> tuple[float, float]:
                searcher.subset_evaluations += 1
                return sub.score_and_cosine(str(searcher.save(searcher.build([layer])[1])))

            searcher.subset_evaluations += 1
            base = sub.score_and_cosine(str(searcher.save(searcher.build([])[1])))
            scores = subset_sensitivity(run.all_layers(), float_only, base)
            timings["sensitivity_s"] = time.perf_counter() - t
            return scores
        if ranking == "single-op":
            scores = single_op_sensitivity(prepared.model, prepared.idx, full, layers, run.captured, run.providers)
        # propagated; also for body layers under single-op: their float inputs cannot be captured
        owned = owned_quantizers(prepared.model, prepared.idx, config, full, layers) if ranking != "single-op" else {}
        for s in subs:
            owned.update(owned_quantizers(s.model, s.idx, config, s.plan, body_layers[s.scope.path]))
        scored = (layers if ranking != "single-op" else []) + [x for s in subs for x in body_layers[s.scope.path]]
        searcher.ranking_runs += 2 * len(layers) if ranking == "single-op" else 0
        searcher.ranking_runs += len(scored) + 1 if scored else 0  # one per layer, and FP32's reference
        if scored:
            scores += propagated_sensitivity(prepared.model, full, scored, run.batches, run.providers,
                                             getattr(evaluate, "output_names", None), owned)
        timings["sensitivity_s"] = time.perf_counter() - t
        return rank_scores(scores)

    if ranking != "end-to-end":
        return rank
    t = time.perf_counter()  # full evaluations of its own, before the search's
    all_layers = {layer.name: layer for layer in run.all_layers()}

    def only(layer: Layer) -> float:
        _, qdq = searcher.build([other for n, other in all_layers.items() if n != layer.name])
        return searcher.measure(qdq, f"only {layer.name} quantized", []).metric

    scores = end_to_end_sensitivity(list(all_layers.values()), only)
    searcher.ranking_trials, searcher.trials = searcher.trials, []  # counted apart from the search's
    timings["sensitivity_s"] = time.perf_counter() - t
    return scores


def _latency_gate(run: _SearchRun, outcome: SearchOutcome, search_report: dict[str, Any], latency_runs: int,
                  max_latency_ratio: float | None) -> None:
    """FP32, all-INT8 and the chosen model timed (ORT CPU, batch 1); a model slower than the limit is swapped for
    a faster one that met the target, else the outcome is not met (stop_reason latency)."""
    t = time.perf_counter()
    prepared, config = run.prepared, run.config
    feed = one_sample(run.batches[0], prepared.inputs)
    lat = {"fp32_ms": measure_latency(prepared.model, feed, latency_runs),
           "all_int8_ms": measure_latency(outcome.all_quantized, feed, latency_runs)
           if outcome.all_quantized is not None else None,
           "final_ms": measure_latency(outcome.qdq, feed, latency_runs)}
    lat["final_vs_fp32"] = round(lat["final_ms"] / lat["fp32_ms"], 3)
    if lat["all_int8_ms"]:
        lat["all_int8_vs_fp32"] = round(lat["all_int8_ms"] / lat["fp32_ms"], 3)
    lat.update({"batch": 1, "runs": latency_runs, "runtime": "onnxruntime CPU, all graph optimizations"})
    search_report["latency"] = lat
    limit = max_latency_ratio if max_latency_ratio is not None else 1.0 \
        if config.target == "ort-cpu" and lat["fp32_ms"] >= LATENCY_GATE_MIN_MS else None
    rows = _tradeoffs(outcome, prepared.model, feed, lat, min(latency_runs, 10))
    if outcome.met and limit is not None and lat["final_vs_fp32"] > limit:
        # the cheapest set by cost is too slow as measured: another model that met the target may not be
        faster = [(r, c) for r, c in zip(rows[1:], outcome.candidates) if r["passed"] and r["vs_fp32"] <= limit]
        if faster:
            row, (trial, plan, qdq) = min(faster, key=lambda rc: (  # the cheapest of them, as _best orders
                set_cost(outcome.costs, rc[1][0].float_layers), set_cost(outcome.costs, rc[1][0].int16_layers),
                len(rc[1][0].float_layers) + len(rc[1][0].int16_layers), -rc[1][0].metric, rc[0]["latency_ms"]))
            log.info("the cheapest model that met the target runs %.2fx FP32 (limit %gx); keeping one measured "
                     "at %.2fx: %s", lat["final_vs_fp32"], limit, row["vs_fp32"], trial.label)
            by_name = {x.name: x for x in outcome.ranking}
            outcome.plan, outcome.qdq = plan, qdq
            outcome.fallback_layers = [by_name[n] for n in trial.float_layers + trial.int16_layers]
            outcome.int16_layers = list(trial.int16_layers)
            outcome.float_form = trial.float_form or None
            outcome.fallback = "mixed" if trial.float_layers and trial.int16_layers else \
                "int16" if trial.int16_layers else "float"
            lat.update(final_ms=row["latency_ms"], final_vs_fp32=row["vs_fp32"], chosen_by="measured latency")
            search_report.update(outcome.to_dict())
        else:
            outcome.met, outcome.stop_reason = False, "latency"
            search_report.update(met=False, stop_reason="latency")
    search_report.update(max_latency_ratio=None if limit is None or math.isinf(limit) else limit,  # JSON: no inf
                         pareto=rows[:1] + pareto(rows[1:]))  # FP32, then the front
    run.timings["latency_s"] = time.perf_counter() - t


def _write(run: _SearchRun, outcome: SearchOutcome, search_report: dict[str, Any], calib_spec: Any,
           t0: float) -> QuantResult:
    """Step 4: the chosen model, its float model (with the technique edits of the layers it quantizes) and the
    report, through the flow's finish."""
    prepared = run.prepared
    kept = run.searcher.kept_edits(outcome.plan)
    for n, v in kept.items():  # the written float model holds the edits of the layers the final model quantizes
        prepared.idx.initializers[n].CopyFrom(numpy_helper.from_array(v, n))
    if run.edits:
        search_report["technique_edits"] = {"kept": len(kept), "dropped": sorted(set(run.edits) - set(kept))}
    return finish(prepared, outcome.plan, outcome.qdq, run.config, run.calib, run.out_dir, run.timings, t0,
                  extra_report={"search": search_report, **run.changed}, calib_data=run.calib_data,
                  calib_spec=calib_spec)


def _raise_unless_met(outcome: SearchOutcome, search_report: dict[str, Any], target: AccuracyTarget,
                      result: QuantResult, max_float_fraction: float | None, fraction: float) -> None:
    """After writing: :class:`TargetNotMetError` (latency, accuracy, budget) or :class:`TooMuchFloatError`, each
    naming what was found; else the outcome logged."""
    names = [s.name for s in outcome.fallback_layers]
    kept = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "none"
    table = pareto_table(search_report["pareto"], outcome.threshold) if "pareto" in search_report else ""
    if outcome.stop_reason == "latency":
        raise TargetNotMetError(
            f"the accuracy target ({target.describe()}) is met only by a model slower than allowed: "
            f"{search_report['latency']['final_vs_fp32']:.2f}x FP32 latency with {len(names)} layer(s) in "
            f"{outcome.fallback} ({kept}), limit {search_report['max_latency_ratio']:g}x (--max-latency-ratio); "
            f"the accuracy/latency trade-offs found (report: search.pareto):\n{table}\n"
            f"the model that met the accuracy target was written to {result.model_path}, marked not met",
            "relax the target, raise --max-latency-ratio, or quantize with the trade-off you prefer "
            "(--exclude-nodes with its float layers)")
    if not outcome.met:
        budget = (f"; the evaluation budget ({outcome.max_evaluations} full evaluations, --max-evaluations) ended "
                  "the search" if outcome.budget_exhausted else "")
        raise TargetNotMetError(
            f"accuracy target not met ({target.describe()}): FP32 {outcome.baseline:.4f}, best quantized "
            f"{max(t.metric for t in outcome.trials if t.label != 'fp32'):.4f}, threshold {outcome.threshold:.4f}; "
            f"the best model found was written to {result.model_path}{budget}"
            + (f"; the trade-offs found (report: search.pareto):\n{table}" if table else ""),
            "raise --max-evaluations" if outcome.budget_exhausted else
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
    if table:
        log.info("accuracy/latency trade-offs found (report: search.pareto):\n%s", table)


# --- the search as configuration (config.search: converter.quantize, qconvert quantize --config, batch jobs) ---------

def accuracy_target(search: SearchConfig) -> AccuracyTarget:
    """The section's target: ``max_drop`` (default 0.01 where no ``min_metric`` is given), relative or absolute."""
    max_drop = 0.01 if search.max_drop is None and search.min_metric is None else search.max_drop
    return AccuracyTarget(max_drop=max_drop, relative=search.relative_drop, min_value=search.min_metric)


def section_evaluator(search: SearchConfig, model: Any, config: QuantConfig,
                      image_spec: str | Path | None = None) -> Evaluator:
    """The section's evaluator: its custom ``evaluator`` (file.py:fn / pkg.mod:fn), else the built-in metric on
    its ``eval`` data against the float model (node names checked first: a typo fails before the FP32 runs)."""
    from ..export import load_module_spec
    from ..graph.model_io import load_model
    from ..graph.passes import preprocess
    from .evaluate import BuiltinEvaluator
    from ..calib.readers import load_labels

    if search.evaluator:
        return load_module_spec(search.evaluator)
    if isinstance(model, onnx.ModelProto):
        float_model = onnx.ModelProto()
        float_model.CopyFrom(model)
    elif isinstance(model, (str, Path)):
        float_model = load_model(model)
    else:
        raise UserError("the search's built-in metric needs the float model as an ONNX file or ModelProto",
                        "export the PyTorch model first (converter.export_torch), or pass an evaluator")
    preprocess(float_model)
    check_node_names(float_model, config)
    labels = load_labels(search.labels) if search.labels else None
    return BuiltinEvaluator(search.metric, float_model, search.eval, labels,
                            batch_size=config.batch_size, image_spec=image_spec, output=search.eval_output)


@removes_created_dirs
def quantize_with_search(model: Any, calib_data: Any, config: QuantConfig | None = None,
                         output_dir: str | Path | None = None, name: str | None = None, example_inputs: Any = None,
                         calib_spec: str | Path | None = None, *, image_spec: str | Path | None = None,
                         evaluate: Evaluator | None = None) -> QuantResult:
    """``converter.quantize``: :func:`converter.pipeline.quantize`, or where ``config.search`` is set, the accuracy
    search with that section's settings (:func:`auto_quantize`; ``evaluate`` replaces the section's evaluator).
    Raises :class:`TargetNotMetError` (exit 1) after writing when the target is not met."""
    config = config or QuantConfig()
    spec = image_spec or calib_spec
    if config.search is None:
        return quantize(model, calib_data, config, output_dir, name, example_inputs, image_spec=spec,
                        repair=float_where_faster)
    s = config.search
    prepare_output_dir(model, calib_data, output_dir, name)  # before the evaluator's FP32 runs
    if evaluate is None:
        evaluate = section_evaluator(s, model, config, spec)
    return auto_quantize(model, calib_data, evaluate, accuracy_target(s), config, output_dir=output_dir, name=name,
                         strategy=s.strategy, sensitivity_samples=s.sensitivity_samples, ranking=s.ranking,
                         fallback=s.fallback, calib_spec=spec, example_inputs=example_inputs,
                         give_back_layers=s.give_back, max_float_fraction=s.max_float_fraction,
                         max_evaluations=s.max_evaluations, max_latency_ratio=s.max_latency_ratio)
