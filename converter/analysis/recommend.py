"""Which technique to try next, from the analyzer's numbers (AIMET's PTQ debugging flow).

After the weights-vs-activations split and the per-layer analyses, :func:`recommend` reads the evidence and
names techniques in the order to try them, each with the numbers behind it and the exact flag:

* **weights dominate** (the metric drops more with only the weights quantized):
  - per-tensor weights and depthwise convolutions whose per-channel weight ranges differ by
    :data:`DEPTHWISE_SPREAD` x or more: **CLE** (``--cle``; ``--cle-relu6 min`` where the model has ReLU6,
    which keeps FP32 exact), or per-channel weights where the target has them;
  - otherwise (or next): **bias correction** (``--bias-correction``) for the mean shift rounding leaves,
    AdaRound (``--adaround``), MSE weight ranges (``--weight-calib mse``), and with 4-bit weights on ort-cpu
    asymmetric ones (``--no-weight-symmetric``: skewed channels use every one of the 16 levels);
* **activations dominate**:
  - a layer output whose min-max range is :data:`OUTLIER_RATIO` x its 99.9% range (a few outliers set the
    scale): a **range method** (``--calib-method percentile``, or ``mse`` / ``entropy``);
  - a MatMul/Gemm with constant weights whose input's largest channel is :data:`CHANNEL_OUTLIER_RATIO` x its
    median channel (persistent per-channel outliers, measured on the per-layer samples): **SmoothQuant**
    (``--smoothquant``, or a larger ``--smoothquant-alpha`` where it is on), tried first;
* **a few layers remain**: the layers whose own quantizers, kept in float, each recover at least
  :data:`FEW_LAYERS_SHARE` of the total drop: **int16** (``int16_nodes`` in ``--config``) or float
  (``--exclude-nodes``).

The split is read from the output cosine where the metric is discrete (top-1 on a few samples ties).

Before any of this, :func:`assess` asks whether there is anything to fix: when the fully quantized model's
metric is within a tolerance of FP32's (:data:`NOTHING_TO_FIX`: half a point of top-1 or top-1 agreement,
0.001 of output cosine; a custom ``evaluate()`` 0.5% of its FP32 value; ``--tolerance`` overrides), the
analyzer recommends nothing and says so, with the numbers and the tolerance. (The digits CNN: INT8 top-1
equals FP32 on 64 held-out samples, output cosine 0.99994; it used to get 3 of its 7 layers recommended for
float, from differences of 1e-5 in cosine.) The per-layer "a few layers remain" rule also needs the drop to
exceed that tolerance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from ..calib.runner import iter_capture
from ..config import QuantConfig
from ..graph.index import GraphIndex, attr

DEPTHWISE_SPREAD = 20.0  # max / min per-channel weight range of a depthwise conv that per-tensor weights lose
OUTLIER_RATIO = 8.0  # min-max range / 99.9% range of a tensor: outliers set its scale
OUTLIER_QUANTILE = 5e-4  # mass left out on each side for the "99.9% range"
CHANNEL_OUTLIER_RATIO = 20.0  # max / median of a MatMul/Gemm input's per-channel max |x|: SmoothQuant's case
FEW_LAYERS_SHARE = 0.25  # a layer kept in float that recovers this share of the total drop is one "that remains"
FEW_LAYERS = 3
NEGLIGIBLE_CHANNEL = 1e-4  # channels below this fraction of the median range are dead (left out of spreads)
# metric -> the drop from FP32 (FP32 minus INT8) below which the analyzer finds nothing to fix
NOTHING_TO_FIX = {"top1": 0.005, "top1-agreement": 0.005, "cosine": 0.001}
NOTHING_TO_FIX_RELATIVE = 0.005  # a custom evaluate(): this fraction of |FP32's value|


def tolerance_for(metric: str, fp32: float, tolerance: float | None = None) -> tuple[float, str]:
    """(the allowed drop, how it was chosen) for ``metric`` (``evaluate()`` for a custom one)."""
    if tolerance is not None:
        return tolerance, "--tolerance"
    if metric in NOTHING_TO_FIX:
        return NOTHING_TO_FIX[metric], f"default for {metric}"
    return NOTHING_TO_FIX_RELATIVE * abs(fp32), f"default: {NOTHING_TO_FIX_RELATIVE:.1%} of FP32's {metric}"


def assess(report: dict[str, Any], tolerance: float | None = None) -> dict[str, Any] | None:
    """Is there anything to fix? From the split (the whole-model metric on the evaluation samples), else the
    per-layer step's FP32 and all-quantized scores. None when neither ran."""
    ev = report.get("evaluation", {})
    split, sens = report.get("split"), report.get("sensitivity")
    if split:
        metric, samples, fp32, int8 = ev.get("metric", "metric"), ev.get("samples"), split["fp32"], \
            split["all_quantized"]
    elif sens:
        metric, samples, fp32, int8 = sens.get("metric", ev.get("layer_metric", "metric")), \
            ev.get("layer_samples"), sens["fp32"], sens["all_quantized"]
    else:
        return None
    tol, how = tolerance_for(metric, fp32, tolerance)
    drop = fp32 - int8
    return {"nothing_to_fix": drop <= tol, "metric": metric, "samples": samples, "fp32": fp32, "int8": int8,
            "drop": drop, "tolerance": tol, "tolerance_from": how}


def assessment_line(a: dict[str, Any] | None) -> str | None:
    if not a:
        return None
    verdict = "nothing to fix" if a["nothing_to_fix"] else "quantization costs more than the tolerance"
    return (f"{verdict}: INT8 {a['metric']} {a['int8']:.6f} vs FP32 {a['fp32']:.6f} on {a['samples']} samples "
            f"(drop {a['drop']:+.6f}, tolerance {a['tolerance']:.6g}, {a['tolerance_from']})")


def depthwise_spreads(model: onnx.ModelProto, idx: GraphIndex) -> dict[str, float]:
    """Depthwise Conv name -> max / min of its per-output-channel max |w| (dead channels left out)."""
    out = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or not idx.is_constant(node.input[1]):
            continue
        w = idx.constant(node.input[1])
        group = attr(node, "group", 1)
        if group <= 1 or w.ndim < 3 or w.shape[1] != 1 or w.shape[0] != group:
            continue
        amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
        live = amax[amax > NEGLIGIBLE_CHANNEL * np.median(amax)]
        if live.size:
            out[node.name] = float(live.max() / live.min())
    return out


def outlier_ratio(obs: Any) -> float | None:
    """Min-max range over the range holding all but :data:`OUTLIER_QUANTILE` of the mass on each side, from an
    observer's histogram (None without one)."""
    counts = getattr(obs, "counts", None)
    if counts is None or getattr(obs, "lo", None) is None:
        return None
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return None
    edges = obs.edges()
    cdf = np.cumsum(counts) / total
    lo_q = edges[int(np.searchsorted(cdf, OUTLIER_QUANTILE))]
    hi_q = edges[min(int(np.searchsorted(cdf, 1 - OUTLIER_QUANTILE)) + 1, len(edges) - 1)]
    lo, hi = obs.range()
    inner = max(hi_q, 0.0) - min(lo_q, 0.0)  # ranges include 0, as encodings do
    full = max(hi, 0.0) - min(lo, 0.0)
    return float(full / inner) if inner > 0 else None


def smoothable_inputs(model: onnx.ModelProto, idx: GraphIndex) -> dict[str, str]:
    """MatMul/Gemm (constant weights) node -> the activation input whose channels SmoothQuant would scale."""
    out = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and idx.is_constant(node.input[1]) \
                and not idx.is_constant(node.input[0]) and not (node.op_type == "Gemm" and attr(node, "transA", 0)):
            out[node.name] = node.input[0]
    return out


def channel_outlier_ratios(model: onnx.ModelProto, idx: GraphIndex, batches: list[dict[str, np.ndarray]],
                           providers: list[str]) -> dict[str, float]:
    """MatMul/Gemm node -> max / median of its input's per-channel (last axis) max |x| on ``batches``."""
    inputs = smoothable_inputs(model, idx)
    if not inputs or not batches:
        return {}
    tensors = sorted(set(inputs.values()))
    amax: dict[str, np.ndarray] = {}
    for values in iter_capture(model, tensors, batches, providers):
        for t in tensors:
            v = np.abs(np.asarray(values[t], dtype=np.float32))
            if v.ndim < 2:
                continue
            m = v.reshape(-1, v.shape[-1]).max(axis=0)
            amax[t] = m if t not in amax else np.maximum(amax[t], m)
    out = {}
    for node, t in inputs.items():
        if t in amax and np.median(amax[t]) > 0:
            out[node] = float(amax[t].max() / np.median(amax[t]))
    return out


def _drops(split: dict[str, Any]) -> tuple[float, float, float, str]:
    """(weights-only drop, activations-only drop, all-quantized drop, the measure used)."""
    values, measure = split, "metric"
    if "output_cosine" in split and split["output_cosine"]:
        c = split["output_cosine"]
        values, measure = {"fp32": 1.0, **c}, "output cosine"
    f = values["fp32"]
    return f - values["weights_only"], f - values["activations_only"], f - values["all_quantized"], measure


def _rec(technique: str, flag: str, reason: str, **evidence: Any) -> dict[str, Any]:
    return {"technique": technique, "flag": flag, "reason": reason, "evidence": evidence}


def recommend(report: dict[str, Any], model: onnx.ModelProto, idx: GraphIndex, observers: dict[str, Any],
              config: QuantConfig, channel_ratios: dict[str, float] | None = None,
              tolerance: float | None = None) -> list[dict[str, Any]]:
    """Techniques to try, first first (see the module doc); each with its evidence and flag. None when
    :func:`assess` finds nothing to fix."""
    recs: list[dict[str, Any]] = []
    verdict = assess(report, tolerance)
    if verdict and verdict["nothing_to_fix"]:
        return recs
    layers = report.get("layers", [])
    split = report.get("split")
    drop_w = drop_a = total = None
    measure = None
    if split:
        drop_w, drop_a, total, measure = _drops(split)
    weights_side = drop_w is None or drop_w >= (drop_a or 0.0)
    acts_side = drop_a is None or drop_a >= (drop_w or 0.0)
    split_ev = ({"measure": measure, "weights_only_drop": drop_w, "activations_only_drop": drop_a,
                 "all_quantized_drop": total} if split else {})

    weight_recs: list[dict[str, Any]] = []
    spreads = depthwise_spreads(model, idx)
    wide = {n: s for n, s in spreads.items() if s >= DEPTHWISE_SPREAD}
    if not config.per_channel and wide:
        worst = max(wide, key=wide.get)
        relu6 = any(n.op_type == "Clip" for n in model.graph.node)
        flag = "--cle --cle-relu6 min" if relu6 else "--cle"
        if config.cle:
            flag = "--cle-relu6 min" if relu6 and config.cle_relu6 == "keep" else "--bias-correction"
        weight_recs.append(_rec(
            "cle", flag,
            f"per-tensor weights: {len(wide)} of {len(spreads)} depthwise convolutions have per-channel weight "
            f"ranges {DEPTHWISE_SPREAD:g}x apart or more (worst {wide[worst]:.0f}x, {worst}); one scale per tensor "
            "leaves their small channels a few levels. Cross-layer equalization rescales the channels (FP32 "
            "unchanged); per-channel weights (--per-channel) avoid it where the runtime has them",
            depthwise_layers=len(spreads), wide_depthwise_layers=len(wide), worst_layer=worst,
            worst_spread=round(wide[worst], 1), threshold=DEPTHWISE_SPREAD, **split_ev))
    weight_rows = [r for r in layers if "weight" in r]
    if weight_rows and weights_side:
        worst_w = min(weight_rows, key=lambda r: r["weight"].get("min_channel_sqnr_db", r["weight"]["sqnr_db"]))
        flags = [] if config.bias_correction else ["--bias-correction"]
        if not config.adaround:
            flags.append("--adaround")
        if config.weight_calib == "minmax":
            flags.append("--weight-calib mse")
        four_bit = config.weight_bits == 4 or 4 in config.weight_bits_overrides.values()
        if four_bit and config.weight_symmetric and config.target == "ort-cpu":
            flags.append("--no-weight-symmetric")
        if flags:
            weight_recs.append(_rec(
                "bias_correction" if "--bias-correction" in flags else "weight_rounding", " | ".join(flags),
                "weight quantization moves the layers' outputs: bias correction removes the mean shift rounding "
                "leaves (empirical on calibration data; --bias-correction-mode analytical|auto from BatchNorm "
                "statistics), better rounding / ranges lower the error itself"
                + (" (asymmetric 4-bit weights: a zero point per channel, every level used)" if
                   "--no-weight-symmetric" in flags else ""),
                worst_weight_layer=worst_w["name"], worst_weight_sqnr_db=round(worst_w["weight"]["sqnr_db"], 2),
                worst_channel_sqnr_db=worst_w["weight"].get("min_channel_sqnr_db"), **split_ev))

    act_recs: list[dict[str, Any]] = []
    ratios = {}
    for r in layers:
        t = r.get("output")
        if t in observers:
            ratio = outlier_ratio(observers[t])
            if ratio is not None:
                ratios[t] = (ratio, r["name"])
    outliers = {t: v for t, v in ratios.items() if v[0] >= OUTLIER_RATIO}
    if outliers:
        worst_t = max(outliers, key=lambda t: outliers[t][0])
        if config.calib_method in ("minmax", "minmax_ema"):
            act_recs.append(_rec(
                "range_method", "--calib-method percentile | --calib-method mse | --calib-method entropy",
                f"{len(outliers)} of {len(ratios)} layer outputs have a min-max range {OUTLIER_RATIO:g}x or more "
                f"their 99.9% range (worst {outliers[worst_t][0]:.0f}x, {outliers[worst_t][1]}): a few outliers set "
                f"the scale and the bulk of the values gets a few levels; a range method clips them",
                outlier_tensors=len(outliers), tensors=len(ratios), worst_tensor=worst_t,
                worst_ratio=round(outliers[worst_t][0], 1), threshold=OUTLIER_RATIO, **split_ev))
    smooth = {n: v for n, v in (channel_ratios or {}).items() if v >= CHANNEL_OUTLIER_RATIO}
    if smooth and acts_side:
        worst_n = max(smooth, key=smooth.get)
        act_recs.insert(0, _rec(
            "smoothquant", "--smoothquant" if not config.smoothquant else "--smoothquant-alpha 0.75",
            f"{len(smooth)} MatMul/Gemm layer(s) with constant weights read inputs whose largest channel is "
            f"{CHANNEL_OUTLIER_RATIO:g}x their median channel or more (worst {smooth[worst_n]:.0f}x, {worst_n}): "
            "per-channel outliers, which SmoothQuant moves into the weights"
            + (" (it is on and left them: a larger alpha migrates more)" if config.smoothquant else ""),
            layers=len(smooth), worst_layer=worst_n, worst_channel_ratio=round(smooth[worst_n], 1),
            threshold=CHANNEL_OUTLIER_RATIO, **split_ev))

    if weights_side:
        recs += weight_recs + act_recs
    else:
        recs += act_recs + weight_recs
    sens = report.get("sensitivity")
    if sens and total is not None and layers:
        base_all, base_fp = sens["all_quantized"], sens["fp32"]
        drop = base_fp - base_all
        if drop > tolerance_for(sens["metric"], base_fp, tolerance)[0]:
            gains = sorted(((r["sensitivity"]["only_this_float"] - base_all, r["name"]) for r in layers
                            if "sensitivity" in r), reverse=True)
            few = [(g, n) for g, n in gains[:FEW_LAYERS] if g >= FEW_LAYERS_SHARE * drop]
            if few:
                names = [n for _, n in few]
                recs.append(_rec(
                    "int16_or_float",
                    f"int16_nodes: [{', '.join(names)}] (--config) | --exclude-nodes {','.join(names)}",
                    f"{len(few)} layer(s) each recover {FEW_LAYERS_SHARE:.0%} or more of the drop when kept in float "
                    f"(per-layer {sens['metric']}): 16-bit activations there, or float, after the techniques above",
                    layers=names, recovered_share=[round(g / drop, 3) for g, _ in few],
                    per_layer_metric=sens["metric"], per_layer_drop=round(drop, 6)))
    for i, r in enumerate(recs):
        r["rank"] = i + 1
    return recs


def recommendation_lines(recs: list[dict[str, Any]], assessment: dict[str, Any] | None = None) -> list[str]:
    """Terminal lines: one per recommendation (technique, flag, reason)."""
    if assessment and assessment["nothing_to_fix"]:
        return [f"recommendations: none, {assessment_line(assessment)}"]
    if not recs:
        return ["recommendations: none (no evidence of per-tensor depthwise damage, weight or activation outliers, "
                "or a few dominant layers)"]
    lines = ["recommendations (try in this order):"]
    for r in recs:
        lines.append(f"  {r['rank']}. {r['technique']}: {r['flag']}")
        lines.append(f"     {r['reason']}")
    return lines
