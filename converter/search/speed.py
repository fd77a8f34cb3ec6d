"""Float where ONNX Runtime CPU runs a layer faster in float: a plain quantize's answer to a model slower than FP32.

On target ``ort-cpu`` a quantized model slower than FP32 is no success (:func:`converter.pipeline.latency_gate`).
Some of such a model's integer kernels are themselves slower than the float kernel they replace, with the
Q/DQ and layout changes around them counted: small convolutions on few channels (PP-OCR's direction
classifier, 48x192 lines). Before a plain quantize writes such a model and exits 1, it tries the model with
exactly those compute layers in float (:func:`float_where_faster`; taking every planned layer as a candidate,
Add/Mul/pooling too, cost twice the time there for the same speed):

1. the all-INT8 model over its limit, as the quality block timed it against FP32 (nothing happens when it is
   within the limit, or too fast to time: :func:`converter.pipeline.finish` calls this only then);
2. each compute layer alone in float, profiled against the all-INT8 model (the search's cost model,
   :func:`converter.search.cost.runtime_costs`: the layer's kernels and the Q/DQ/layout nodes on its two sides);
   the layers whose float form costs less than their integer one (``delta`` below 0) are the candidates;
3. the model with the candidates in float (``exclude_nodes``: their neighbours stay quantized, as the profile
   measured them) rendered from the same calibration (:func:`converter.pipeline.render_plan`, as the accuracy
   search renders its tries: no calibration again; the techniques' weight/bias edits kept for the layers still
   quantized, dropped for the float ones), and timed in turns against the all-INT8 model: kept only when it is
   faster;
4. twice more, the layers beside the float ones profiled again with those in float (an island of float layers
   shares the Q/DQ between them, so a neighbour's float form may pay now).

A float layer as a rule brings the model closer to FP32's outputs, so what this trades is INT8 coverage, not
accuracy; the report (``float_where_faster``) lists the layers, the timings and the cost, and the usual latency
gate then judges the model written. As in the accuracy search, a float layer reads its original weights and bias,
and the layers still quantized keep what the techniques fitted with it quantized (bias correction's shifts,
network tuning's scales), so the quality block's figures are the written model's own. Skipped (with the reason in
the report) where that rendering does not apply: If/Loop/Scan bodies, a model over the protobuf limit, more than
:data:`MAX_LAYERS` compute layers (one profiled session each).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import onnx
from onnx import numpy_helper

from ..calib.readers import one_sample
from ..calib.runner import make_session
from ..graph.model_io import is_large
from ..pipeline import Prepared, kept_edits, latency_limit, render_plan
from ..quant.layers import plan_layers
from ..quant.plan import QuantPlan
from ..timing import paired_latency
from .cost import COMPUTE_OPS, runtime_costs

log = logging.getLogger("converter")

MAX_LAYERS = 400  # compute layers profiled one by one at most (PP-OCR's 50: 15-40 s on 2 cores)
FLOAT_FRACTION_WARNING = 0.25  # more than this share of the compute layers in float: the result is barely INT8
MAX_ROUNDS = 3  # profiling rounds: all layers, then twice the neighbours of the float ones
PROFILE_BUDGET_S = 60.0  # profiled runs per layer scaled so that one round takes about this long (3 to 20 runs)
KEEP_BELOW = 0.98  # the repaired model is kept when its paired time is under this share of the all-INT8 model's


def _first_sample(state) -> dict | None:
    for batch in state.data(1):
        return one_sample(batch, state.inputs)
    return None


def _ratio(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict, threads: int):
    """Paired batch-1 timing of ``b`` against ``a`` on ONNX Runtime CPU (sessions without spinning, as the quality
    block times them)."""
    sa = make_session(a, ["CPUExecutionProvider"], threads, full_optimization=True, spinning=False)
    sb = make_session(b, ["CPUExecutionProvider"], threads, full_optimization=True, spinning=False)
    names = {i.name for i in sa.get_inputs()}
    feed = {k: v for k, v in feed.items() if k in names}
    return paired_latency(lambda: sa.run(None, feed), lambda: sb.run(None, feed))


def float_where_faster(state: Prepared, qdq: onnx.ModelProto, ratio: float,
                       quant_ms: float = 1.0) -> tuple[QuantPlan, onnx.ModelProto, dict] | None:
    """For an all-INT8 ``qdq`` measured at ``ratio`` x FP32 and ``quant_ms`` a run (over its limit: the quality
    block's paired timing),
    the plan and QDQ model with the layers ONNX Runtime CPU runs faster in float kept in float, and the report's
    entry; ``(state.plan, qdq, entry)`` when nothing changed, None when the step is off (see the module doc). On a
    change, ``state.model`` holds the techniques' edits of the layers still quantized."""
    config = state.config
    limit = latency_limit(config)
    if config.target != "ort-cpu" or not config.float_where_faster or limit is None or math.isinf(limit):
        return None
    t0 = time.perf_counter()
    feed = _first_sample(state)
    if feed is None:
        return None
    entry: dict[str, Any] = {"ratio_before": round(ratio, 3), "max_latency_ratio": limit, "float_layers": []}
    layers = [x for x in plan_layers(state.plan, state.idx) if x.op_type in COMPUTE_OPS]
    why = ("the model has If/Loop/Scan bodies" if state.subs else
           "the model is over the protobuf limit" if is_large(state.model) else
           f"{len(layers)} compute layers (at most {MAX_LAYERS} are profiled one by one)"
           if len(layers) > MAX_LAYERS else "")
    if why:
        log.info("float where faster: skipped: %s", why)
        return state.plan, qdq, {**entry, "skipped": why}
    runs = int(min(20, max(3, PROFILE_BUDGET_S * 1000.0 / (len(layers) * max(quant_ms, 1e-3)))))
    entry["profile_runs"] = runs
    log.info("the all-INT8 model runs x%.2f FP32's time (limit x%g): profiling its %d compute layers in float, one "
             "at a time (%d runs each), for the ones ONNX Runtime CPU runs faster in float", ratio, limit, len(layers),
             runs)
    edits = state.take_edits()  # the float model again; the kept layers' edits go back below
    by_name = {x.name: x for x in layers}

    def build(names: list[str]) -> tuple[QuantPlan, onnx.ModelProto]:
        nodes = tuple(n for name in names for n in by_name[name].nodes)
        return render_plan(state, config.replace(exclude_nodes=tuple(config.exclude_nodes) + nodes),
                           state.calib.observers, state.calib.methods, state.provided.get("uncalibrated", []),
                           edits, nodes[:3], base=config)

    chosen, plan, model, vs_all_int8 = [], state.plan, qdq, 1.0
    try:
        todo, entry["rounds"] = list(by_name), []
        for _ in range(MAX_ROUNDS):
            base = list(chosen)
            costs = runtime_costs(model, feed, todo, lambda names: build(base + names)[1],  # noqa: B023 - used now
                                  runs=runs, threads=config.threads)
            found = sorted((n for n in todo if costs.delta(n) < 0), key=costs.delta)
            if not found:
                break
            plan_f, qdq_f = build(base + found)
            after = _ratio(model, qdq_f, feed, config.threads)
            entry["rounds"].append({"profiled": len(todo), "candidates_ms": {n: round(costs.delta(n), 4) for n in found},
                                    "vs_before": round(after.ratio, 3) if after.ratio is not None else None})
            if after.ratio is None or after.ratio >= KEEP_BELOW:
                break
            chosen, plan, model, vs_all_int8 = base + found, plan_f, qdq_f, vs_all_int8 * after.ratio
            # next round: the layers beside the new float ones (an island shares its Q/DQ: a neighbour's float form
            # may pay now); the others' costs did not change
            todo = sorted({m for n in found for side in costs.boundary.get(n, ()) for m in side.layers
                           if m in by_name and m not in chosen})
            if not todo:
                break
        entry["float_layers"] = chosen
    finally:
        kept = kept_edits(edits, plan) if plan is not state.plan else edits
        for n, v in kept.items():
            state.idx.initializers[n].CopyFrom(numpy_helper.from_array(v, n))
        if plan is not state.plan and edits:
            entry["technique_edits_dropped"] = sorted(set(edits) - set(kept))
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    if entry["float_layers"]:
        entry["vs_all_int8"] = round(vs_all_int8, 3)  # the kept rounds' paired ratios, each against the one before
        log.info("float where faster: %d layer(s) kept in float (%s): x%.2f the all-INT8 model's time (%.1f s)",
                 len(chosen), ", ".join(chosen[:5]) + (" ..." if len(chosen) > 5 else ""), vs_all_int8,
                 entry["seconds"])
        if len(chosen) > FLOAT_FRACTION_WARNING * len(layers):
            log.warning("float where faster kept %d of %d compute layers in float: ONNX Runtime CPU gains little "
                        "from quantizing this model; quantize for the runtime that will run it (--target)",
                        len(chosen), len(layers))
    else:
        log.info("float where faster: no layer runs faster in float by enough to keep (%.1f s)", entry["seconds"])
    return plan, model, entry
