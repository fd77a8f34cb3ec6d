"""``qconvert analyze``: where quantization hurts; writes report.json/.html and prints the summary."""

from __future__ import annotations

import argparse

from ..analysis.analyzer import STEPS, AnalysisConfig, analyze, summary_text
from ..analysis.metrics import MODEL_METRICS
from ..config import SECTIONS, QuantConfig
from ..export import load_module_spec
from .config_flags import add_config_flags, config_from_args

# quantize's flags analyze takes (their help and parsing from converter.config's field metadata)
ANALYZE_CONFIG_FLAGS = ("target", "calib_method", "weight_calib", "max_samples", "providers")


def add_args(p: argparse.ArgumentParser) -> None:
    d = AnalysisConfig()
    p.add_argument("model", help="float ONNX model")
    p.add_argument("--calib", required=True, help="directory of .npy/.npz files, or images + preprocess.yaml")
    p.add_argument("--eval", help="evaluation data (same formats; default: the calibration data)")
    p.add_argument("--labels", help="class indices of the evaluation samples (.npy or text, one per line)")
    p.add_argument("--evaluator", dest="evaluate",
                   help="MODULE:FUNCTION or file.py:FUNCTION, evaluate(model_path) -> float, "
                        "higher is better (replaces the built-in metric)")
    p.add_argument("--evaluate", dest="evaluate", help=argparse.SUPPRESS)  # old spelling
    p.add_argument("-o", "--output-dir", required=True, help="folder for report.json and report.html")
    p.add_argument("--config", help="YAML/JSON file with QuantConfig keys")
    p.add_argument("--image-spec", dest="calib_spec", metavar="YAML",
                   help="image preprocessing spec (default: preprocess.yaml in the data folder)")
    p.add_argument("--calib-spec", dest="calib_spec", help=argparse.SUPPRESS)  # old spelling
    g = p.add_argument_group("quantization", "as quantize's (config keys; --config for the others)")
    add_config_flags({s: g for s in SECTIONS}, only=ANALYZE_CONFIG_FLAGS)
    p.add_argument("--metric", choices=["auto", *MODEL_METRICS], default="auto",
                   help="model metric; auto: top1 with --labels, else agreement for classifiers, else cosine")
    p.add_argument("--layer-metric", choices=["same", *MODEL_METRICS], default="cosine",
                   help="metric of the per-layer sensitivity (cosine: informative on a few samples)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="evaluation samples for the model metric (0: all)")
    p.add_argument("--layer-samples", type=int, default=d.layer_samples,
                   help="evaluation samples for each per-layer measurement")
    p.add_argument("--steps", help=f"comma-separated subset of: {','.join(STEPS)} (default: all)")
    p.add_argument("--tolerance", type=float,
                   help="metric drop from FP32 with nothing to fix: no recommendation (default: 0.005 for top1 and "
                        "top1-agreement, 0.001 for cosine, 0.5%% of FP32 for --evaluator)")


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args, QuantConfig.from_file(args.config) if args.config else QuantConfig(),
                              ANALYZE_CONFIG_FLAGS)
    cfg = AnalysisConfig(metric=args.metric, layer_metric=args.layer_metric, eval_samples=args.eval_samples,
                         layer_samples=args.layer_samples, tolerance=args.tolerance,
                         steps=tuple(s for s in args.steps.split(",") if s) if args.steps else STEPS)
    evaluate = None
    if args.evaluate:
        evaluate = load_module_spec(args.evaluate)
    result = analyze(args.model, args.calib, config, args.output_dir, eval_data=args.eval, labels=args.labels,
                     evaluate=evaluate, analysis=cfg, calib_spec=args.calib_spec)
    print(summary_text(result.report))
    print(f"  report.json {result.report_path}\n  report.html {result.html_path}")
    return 0
