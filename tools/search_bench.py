"""Fallback search vs ONNX Runtime quantize_static, per model: float layers, evaluations, metric, latency.

For each model, three quantized versions beside FP32:

* **ours**: ``converter.search.auto_quantize`` with default settings (``QuantConfig()``, gallop
  strategy, propagated ranking) to the model's accuracy target;
* **ORT all ops**: ``quantize_static(QDQ, per_channel=True, MinMax, activations QUInt8, weights
  QInt8)`` on every op it quantizes, no search;
* **ORT hand-tuned**: the same with the ``op_types_to_quantize`` a user would pick by hand:
  ``["MatMul"]`` for MiniLM, ``["Conv", "Gemm"]`` for the CNNs, all ops for the detector (its only
  compute ops are Conv: the same model as "ORT all ops").

Models (``--models``, default ``minilm,effnet,detector``; ``resnet8`` optional):

* ``minilm``: all-MiniLM-L6-v2 (``--minilm-onnx PATH``, default: export with
  ``$ASSETS/minilm-sts/export.py``). Calibration: the first 200 distinct STS-B test sentences;
  evaluation: the next 200; both padded to 128 tokens. Metric: cosine of output 0
  (``last_hidden_state``) to FP32, target drop <= 0.01 (absolute). Also the STS-B test Spearman
  (1379 pairs) of FP32, ours and ORT.
* ``effnet``: EfficientNet-Lite0, 100 calibration ImageNet samples, top-1 on the other 900 against
  labels, target drop <= 0.005.
* ``resnet8``: MLPerf Tiny ResNet-8, 200 calibration CIFAR-10 images, top-1 on 2000, drop <= 0.003.
* ``detector``: models/digits_detector.py (YOLO-style, ``Concat([boxes 0..320, scores 0..1])``),
  100 calibration canvases, 500 evaluation canvases; metric: thresholded class-score agreement with
  FP32 (cells with objectness > 0.5), target drop <= 0.01. Also: distinct score values, max abs
  score error, detection accuracy.

Columns: float layers / compute layers (Conv, Gemm, MatMul; for ORT's models a compute op not fed by
a DequantizeLinear counts as float), full evaluations of the model (ours: the search's, FP32
included; ORT: 1), metric vs threshold, and latency at batch 1 on ONNX Runtime CPU (all graph
optimizations, ``--threads`` intra-op threads, default 1): ``--runs`` rounds (default 50) in which
each model runs once in a rotating order, median ms, ratio to FP32.

    python -m tools.search_bench [--assets DIR] [--models minilm,effnet,detector] [--minilm-onnx PATH]
                                 [--runs N] [--threads T] [--json FILE]

Exit status 1 when our search misses a target.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from converter import AccuracyTarget, BuiltinEvaluator, QuantConfig, TargetNotMetError, auto_quantize
from converter.options import output_paths
from converter.search.cost import COMPUTE_OPS

from .benchlib.assets import STSB, add_assets_argument, assets_or_exit, feeds, minilm_export, stsb_rows, tokenizer
from .benchlib.measure import compare_latency
from .benchlib.ort_baseline import ort_quantize_static
from .benchlib.tasks import ROOT, batches


FP32, OURS, ORT_ALL, ORT_HAND = "fp32", "ours", "ort_all_ops", "ort_hand_tuned"
LABELS = {FP32: "FP32", OURS: "ours (auto_quantize)", ORT_ALL: "ORT quantize_static, all ops",
          ORT_HAND: "ORT quantize_static, hand-tuned"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- models ----------------------------------------------------------------------------------------

class Bench:
    """One model: its file, calibration batches, evaluator, target, latency feed and ORT's hand-tuned ops."""

    def __init__(self, key, title, model, calib, evaluate, target, feed, hand_ops, metric_name, extra=None):
        self.key, self.title, self.model, self.calib = key, title, Path(model), calib
        self.evaluate, self.target, self.feed, self.hand_ops = evaluate, target, feed, hand_ops
        self.metric_name = metric_name
        self.extra = extra or (lambda path: {})  # path -> extra figures for one model


def _float_proto(path: Path) -> onnx.ModelProto:
    from converter.graph.model_io import load_model
    from converter.graph.passes import preprocess

    m = load_model(path)
    preprocess(m)
    return m


def _batches(name: str, x: np.ndarray, size: int) -> list[dict]:
    return batches(x, size, name)  # tools.benchlib's; this name is search_ranking's


def cnn_bench(key: str, assets: Path) -> Bench:
    from .bench_e2e import efficientnet_task, resnet8_task

    task = (efficientnet_task if key == "effnet" else resnet8_task)(assets)
    drop = 0.005 if key == "effnet" else 0.003
    eval_batches = _batches(task.input_name, task.eval_x, task.eval_batch)
    evaluate = BuiltinEvaluator("top1", _float_proto(task.model), eval_batches, task.eval_y)
    return Bench(key, task.title, task.model, _batches(task.input_name, task.calib, 16), evaluate,
                 AccuracyTarget(max_drop=drop), {task.input_name: task.eval_x[:1]}, ["Conv", "Gemm"], "top-1")


def detector_bench(work: Path) -> Bench:
    import torch

    from converter import export_torch

    spec = importlib.util.spec_from_file_location("_bench_digits_detector", ROOT / "models" / "digits_detector.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = work / "detector.onnx"
    export_torch(mod.build(), torch.zeros(mod.INPUT_SHAPE), path)
    x_cal, _ = mod.make_data(100, seed=10)
    x_eval, gt = mod.make_data(500, seed=11)
    evaluate = mod.ScoreAgreement(str(path), x_eval)

    def extra(p):
        out = evaluate.outputs(str(p))
        return {**mod.score_resolution(out, evaluate.reference), "detection_accuracy": mod.detection_accuracy(out, gt)}

    return Bench("detector", "digits detector (models/digits_detector.py, calib 100, eval 500 canvases)", path,
                 _batches(mod.INPUT_NAME, x_cal, 16), evaluate, AccuracyTarget(max_drop=0.01),
                 {mod.INPUT_NAME: x_eval[:1]}, None, "class-score agreement", extra)


def minilm_bench(assets: Path, work: Path, onnx_path: str | None) -> Bench:
    if onnx_path is None:
        onnx_path = str(work / "minilm.onnx")
        log(f"exporting MiniLM to {onnx_path}")
        minilm_export(assets, onnx_path)
    rows = stsb_rows(assets)
    sentences = list(dict.fromkeys(s for r in rows for s in (r[5], r[6])))
    tok = tokenizer(assets, fixed=True)
    calib = [feeds(tok, sentences[i:i + 8]) for i in range(0, 200, 8)]
    eval_batches = [feeds(tok, sentences[i:i + 25]) for i in range(200, 400, 25)]
    evaluate = BuiltinEvaluator("cosine", _float_proto(Path(onnx_path)), eval_batches)
    stsb = STSB(assets)
    return Bench("minilm", "all-MiniLM-L6-v2 (calib 200 / eval 200 STS-B sentences, seq 128)", onnx_path, calib,
                 evaluate, AccuracyTarget(max_drop=0.01), feeds(tok, sentences[400:401]), ["MatMul"],
                 "cosine (last_hidden_state)", lambda p: {"stsb_spearman": stsb(str(p))})


# --- quantizers ----------------------------------------------------------------------------------

def ours(b: Bench, work: Path) -> tuple[Path, dict]:
    out = work / f"ours_{b.key}"
    t = time.perf_counter()
    try:
        res = auto_quantize(str(b.model), b.calib, b.evaluate, b.target, QuantConfig(), output_dir=out, name=b.key,
                            latency_runs=20)
        report, path = res.report, Path(res.model_path)
    except TargetNotMetError as exc:
        log(f"TARGET NOT MET: {exc}")
        path, _, report_path = output_paths(out, b.key)
        report = json.loads(report_path.read_text())
    s = report["search"]
    metric = s["final_metric"]
    n_float, n_compute = float_compute_ops(path)  # from the model: the ranking is empty when all-INT8 passes
    return path, {"met": s["met"], "baseline": s["baseline_metric"], "threshold": s["threshold"],
                  "metric": metric, "report_final_metric": s["final_metric"], "evaluations": s["full_evaluations"],
                  "float_layers": n_float, "compute_layers": n_compute, "float_fraction": s["float_fraction"],
                  "float_mac_fraction": s["float_mac_fraction"], "ranked_layers": len(s["ranking"]),
                  "fallback_layers": [(r["name"], r["op_type"]) for r in s["fallback_layers"]],
                  "strategy_prefix": s["strategy_prefix"], "given_back": s["given_back"],
                  "search_latency": s.get("latency"), "search_evaluations": s["evaluations"],
                  "split_scale_groups": report["summary"].get("split_scale_groups"),
                  "wall_s": round(time.perf_counter() - t, 1)}


def ort_static(b: Bench, work: Path, label: str, op_types: list[str] | None) -> tuple[Path, dict]:
    folder = work / f"{label}_{b.key}"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{b.key}_qdq.onnx"
    seconds = ort_quantize_static(b.model, b.calib, out, op_types_to_quantize=op_types)
    n_float, n_compute = float_compute_ops(out)
    return out, {"op_types_to_quantize": op_types or "all", "float_layers": n_float, "compute_layers": n_compute,
                 "evaluations": 1, "quantize_s": round(seconds, 1)}


def float_compute_ops(path: Path) -> tuple[int, int]:
    """(compute ops left in float: an operand not dequantized, compute ops) in a QDQ model."""
    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    compute = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    floats = [n for n in compute  # INT8: both operands (data, weight) dequantized
              if any(getattr(producer.get(t), "op_type", None) != "DequantizeLinear" for t in n.input[:2])]
    return len(floats), len(compute)


# --- latency -------------------------------------------------------------------------------------

def latency(paths: dict[str, Path], feed: dict, threads: int, runs: int, warmup: int = 5) -> dict[str, float]:
    """Batch-1 median ms (``tools.benchlib`` timer: every round runs each model once, the order rotated)."""
    return {k: round(v, 3) for k, v in compare_latency(paths, feed, runs, warmup, threads).items()}


# --- driver --------------------------------------------------------------------------------------

def run_bench(b: Bench, work: Path, args) -> dict:
    log(f"== {b.title}")
    rows: dict[str, dict] = {}
    paths: dict[str, Path] = {FP32: b.model}
    _, n_compute = float_compute_ops(b.model)
    t = time.perf_counter()
    baseline = b.evaluate(str(b.model))
    rows[FP32] = {"float_layers": n_compute, "compute_layers": n_compute, "evaluations": 1, "metric": baseline,
                  "eval_s": round(time.perf_counter() - t, 1)}
    threshold = b.target.threshold(baseline)
    log("  ours: auto_quantize ...")
    paths[OURS], rows[OURS] = ours(b, work)
    log("  ORT all ops ...")
    paths[ORT_ALL], rows[ORT_ALL] = ort_static(b, work, "ort_all", None)
    rows[ORT_ALL]["metric"] = b.evaluate(str(paths[ORT_ALL]))
    if b.hand_ops is not None:
        log(f"  ORT hand-tuned {b.hand_ops} ...")
        paths[ORT_HAND], rows[ORT_HAND] = ort_static(b, work, "ort_hand", b.hand_ops)
        rows[ORT_HAND]["metric"] = b.evaluate(str(paths[ORT_HAND]))
    for k, p in paths.items():
        rows[k]["threshold"] = threshold
        rows[k]["met"] = bool(rows[k]["metric"] >= threshold - 1e-12)
        log(f"  extra figures {k} ...")
        rows[k].update(b.extra(p))
    if b.hand_ops is None:
        rows[ORT_HAND] = {**rows[ORT_ALL], "same_as": ORT_ALL}
    log("  latency ...")
    ms = latency(paths, b.feed, args.threads, args.runs)
    for k in rows:
        src = rows[k].get("same_as", k)
        rows[k]["latency_ms"] = ms[src]
        rows[k]["vs_fp32"] = round(ms[src] / ms[FP32], 3)
    return {"model": b.title, "key": b.key, "metric": b.metric_name, "target": b.target.describe(),
            "baseline": baseline, "threshold": threshold, "rows": rows}


def print_table(r: dict) -> None:
    print(f"\n{r['model']}\n  metric: {r['metric']}, target {r['target']}: FP32 {r['baseline']:.4f}, "
          f"threshold {r['threshold']:.4f}")
    print(f"  {'':50s} {'float/compute':>13s} {'evals':>5s} {'metric':>8s} {'met':>5s} {'ms b1':>8s} {'vs FP32':>7s}")
    for k in (FP32, OURS, ORT_ALL, ORT_HAND):
        row = r["rows"][k]
        label = LABELS[k] + (f" {row['op_types_to_quantize']}" if k == ORT_HAND and "same_as" not in row else "")
        if "same_as" in row:
            label += " (= all ops)"
        print(f"  {label:50s} {row['float_layers']:>6d}/{row['compute_layers']:<6d} {row['evaluations']:>5d} "
              f"{row['metric']:>8.4f} {str(row['met']):>5s} {row['latency_ms']:>8.2f} {row['vs_fp32']:>7.2f}")
    o = r["rows"][OURS]
    print(f"  ours: kept in float {o['fallback_layers']} (float MAC fraction {o['float_mac_fraction']}), "
          f"strategy prefix {o['strategy_prefix']}, given back {o['given_back']}, wall {o['wall_s']} s")
    if o.get("search_latency"):
        sl = o["search_latency"]
        all_int8 = sl.get("all_int8_ms") or float("nan")
        print(f"  ours, the search's own latency (default threads): FP32 {sl['fp32_ms']:.2f} ms, final "
              f"{sl['final_ms']:.2f} ms ({sl['final_vs_fp32']}), all-INT8 {all_int8:.2f} ms")
    extras = {k: {e: v for e, v in row.items() if e in ("stsb_spearman", "distinct_scores", "max_abs_err",
                                                         "p99_abs_err", "mean_abs_err", "box_max_abs_err",
                                                         "detection_accuracy")}
              for k, row in r["rows"].items() if "same_as" not in row}
    if any(extras.values()):
        for k, e in extras.items():
            print(f"  {LABELS[k]:50s} " + ", ".join(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}"
                                                      for n, v in e.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_assets_argument(ap)
    ap.add_argument("--models", default="minilm,effnet,detector")
    ap.add_argument("--minilm-onnx", help="exported MiniLM ONNX (default: export with the assets' export.py)")
    ap.add_argument("--runs", type=int, default=50, help="latency rounds (default 50)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for latency (default 1)")
    ap.add_argument("--json")
    ap.add_argument("--keep", help="keep the models in this folder (default: a temp folder, removed)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="converter: %(message)s")
    assets = assets_or_exit(args.assets)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="search_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for key in [k.strip() for k in args.models.split(",") if k.strip()]:
            t = time.perf_counter()
            if key in ("effnet", "resnet8"):
                b = cnn_bench(key, assets)
            elif key == "detector":
                b = detector_bench(work)
            elif key == "minilm":
                b = minilm_bench(assets, work, args.minilm_onnx)
            else:
                ap.error(f"unknown model {key!r}: use minilm, effnet, resnet8, detector")
            r = run_bench(b, work, args)
            r["wall_s"] = round(time.perf_counter() - t, 1)
            results.append(r)
            print_table(r)
            sys.stdout.flush()
            if args.json:  # written after every model: a long run keeps what it has
                Path(args.json).write_text(json.dumps({"threads": args.threads, "runs": args.runs,
                                                       "models": results}, indent=2, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["rows"][OURS]["met"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
