"""Which ranking spends the search's evaluations best: ``propagated`` vs ``subset`` (NNCF's), per model.

For each model and each ranking (``--rankings``, default ``propagated,subset``) one
``converter.search.auto_quantize`` run with default settings otherwise (gallop, give-back, the default
evaluation budget, the latency gate on), and one row: layers kept in float, compute INT8 share, every
model run the search made (full evaluations, subset evaluations, ranking runs on the sensitivity samples),
the final metric, and the search's own batch-1 latency vs FP32 and all-INT8 (ONNX Runtime CPU).

Models (``--models``, default ``resnet8,minilm``):

* ``resnet8``: MLPerf Tiny ResNet-8, 200 calibration CIFAR-10 images, 2,000 evaluation images; metric:
  top-1 agreement with FP32, target ``>= 0.99`` (NNCF's figures on this model and target: docs/results.md).
* ``effnet``: EfficientNet-Lite0, 100 calibration / 900 evaluation ImageNet samples, top-1 agreement with
  FP32, target drop <= 0.005.
* ``minilm``: all-MiniLM-L6-v2, 200 calibration / 200 evaluation STS-B sentences (seq 128), cosine of
  ``last_hidden_state`` to FP32, target drop <= 0.01.

    python -m tools.search_ranking [--assets DIR] [--models resnet8,minilm] [--rankings propagated,subset]
                                   [--minilm-onnx PATH] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from converter import AccuracyTarget, BuiltinEvaluator, QuantConfig, TargetNotMetError, auto_quantize
from converter.options import output_paths

from .search_bench import _batches, _float_proto, float_compute_ops, minilm_bench
from .benchlib.assets import add_assets_argument, assets_or_exit


def cnn(key: str, assets: Path):
    from .bench_e2e import efficientnet_task, resnet8_task

    task = (efficientnet_task if key == "effnet" else resnet8_task)(assets)
    evaluate = BuiltinEvaluator("agreement", _float_proto(task.model),
                                _batches(task.input_name, task.eval_x, task.eval_batch))
    target = AccuracyTarget(max_drop=None, min_value=0.99) if key == "resnet8" else AccuracyTarget(max_drop=0.005)
    return task.title, task.model, _batches(task.input_name, task.calib, 16), evaluate, target


def run(key, title, model, calib, evaluate, target, ranking: str, work: Path, strategy: str = "gallop") -> dict:
    out = work / f"{key}_{ranking}_{strategy}"
    t = time.perf_counter()
    error = None
    try:
        res = auto_quantize(str(model), calib, evaluate, target, QuantConfig(), output_dir=out, name=key,
                            ranking=ranking, latency_runs=20, strategy=strategy)
        report, path = res.report, Path(res.model_path)
    except TargetNotMetError as exc:
        error = exc.message
        path, _, report_path = output_paths(out, key)
        report = json.loads(report_path.read_text())
    s = report["search"]
    n_float, n_compute = float_compute_ops(path)
    lat = s.get("latency") or {}
    return {"model": title, "ranking": ranking, "strategy": strategy, "target": s["target"], "met": s["met"],
            "stop_reason": s.get("stop_reason"), "baseline": s["baseline_metric"], "final": s["final_metric"],
            "threshold": s["threshold"], "fallback_layers": [r["name"] for r in s["fallback_layers"]],
            "float_compute_ops": n_float, "compute_ops": n_compute, "counts": s["evaluation_counts"],
            "max_evaluations": s["max_evaluations"], "budget_exhausted": s["budget_exhausted"],
            "final_vs_fp32": lat.get("final_vs_fp32"), "all_int8_vs_fp32": lat.get("all_int8_vs_fp32"),
            "wall_s": round(time.perf_counter() - t, 1), "error": error,
            "evaluations": [(e["label"], round(e["metric"], 4), e["passed"]) for e in s["evaluations"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_assets_argument(ap)
    ap.add_argument("--models", default="resnet8,minilm")
    ap.add_argument("--rankings", default="propagated,subset")
    ap.add_argument("--strategy", default="gallop", help="the search's strategy (default: gallop)")
    ap.add_argument("--minilm-onnx", help="exported MiniLM ONNX (default: export with the assets' export.py)")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    logging.basicConfig(level=logging.WARNING, format="converter: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="search_ranking_"))
    rows = []
    for key in [k.strip() for k in args.models.split(",") if k.strip()]:
        if key == "minilm":
            b = minilm_bench(Path(args.assets), work, args.minilm_onnx)
            spec = (b.title, b.model, b.calib, b.evaluate, b.target)
        else:
            spec = cnn(key, Path(args.assets))
        for ranking in [r.strip() for r in args.rankings.split(",") if r.strip()]:
            print(f"== {spec[0]}: ranking {ranking}", file=sys.stderr, flush=True)
            r = run(key, *spec, ranking, work, args.strategy)
            rows.append(r)
            c = r["counts"]
            print(f"{key:8s} {ranking:10s} {args.strategy:10s} met {str(r['met']):5s} ({r['stop_reason'] or 'ok'}) metric "
                  f"{r['final']:.4f} (FP32 {r['baseline']:.4f}, threshold {r['threshold']:.4f}); float layers "
                  f"{len(r['fallback_layers'])} ({r['float_compute_ops']}/{r['compute_ops']} compute ops float); "
                  f"runs: {c['full']} full, {c['subset']} subset, {c['ranking_runs']} ranking ({c['total']} total; "
                  f"budget {r['max_evaluations']}{', spent' if r['budget_exhausted'] else ''}); latency "
                  f"{r['final_vs_fp32']}x FP32 (all-INT8 {r['all_int8_vs_fp32']}x); {r['wall_s']} s", flush=True)
            print(f"         float: {r['fallback_layers']}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
