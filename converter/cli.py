"""``qconvert`` command line: subcommands registered in one table.

Every user error ends as ``error: ...`` / ``fix: ...`` on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from .config import CALIB_METHODS, WEIGHT_CALIB_METHODS
from .errors import UserError

log = logging.getLogger("converter")


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,3,224,224)")
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be a positive integer")
    return dims


# --- export ----------------------------------------------------------------------------------------

def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("module_spec", help="package.module:factory or path/to/file.py:factory returning an nn.Module")
    p.add_argument("--input-shape", type=_shape, required=True, help="example input shape, e.g. 1,3,224,224")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--static-batch", action="store_true", help="keep the batch dimension fixed")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")


def _run_export(args: argparse.Namespace) -> int:
    import torch

    from .export import build_module, export_torch

    module = build_module(args.module_spec)
    out = Path(args.output)
    _check_parent(out)
    export_torch(module, torch.zeros(args.input_shape), out, opset=args.opset,
                 dynamic_batch=not args.static_batch, simplify=not args.no_simplify)
    print(f"exported {args.module_spec} -> {out}")
    return 0


# --- quantize --------------------------------------------------------------------------------------

def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="float ONNX model")
    p.add_argument("--calib", required=True, help="directory of .npy/.npz files, or images + preprocess.yaml")
    p.add_argument("-o", "--output-dir", required=True)
    p.add_argument("--config", help="YAML/JSON file with QuantConfig keys (command-line options override it)")
    p.add_argument("--name", help="output file stem (default: the model file's stem)")
    p.add_argument("--target", choices=["ort-cpu", "tensorrt", "qnn"])
    p.add_argument("--calib-method", choices=list(CALIB_METHODS),
                   help="activation ranges (per-tensor/op-type overrides: calib_overrides in --config)")
    p.add_argument("--weight-calib", choices=list(WEIGHT_CALIB_METHODS),
                   help="weight ranges per channel: max |w| (default) or the clipping that minimises MSE")
    p.add_argument("--percentile", type=float)
    p.add_argument("--calib-spec", help="image preprocessing spec (default: preprocess.yaml in --calib)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--per-channel", dest="per_channel", action="store_true", default=None)
    g.add_argument("--per-tensor", dest="per_channel", action="store_false")
    p.add_argument("--max-samples", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--activation-bits", type=int, choices=[8, 16])
    p.add_argument("--exclude-nodes", help="comma-separated node names to keep in float")
    p.add_argument("--providers", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int)
    p.add_argument("--encodings-version", choices=["1.0.0", "0.6.1"])
    p.add_argument("--smoothquant", action=argparse.BooleanOptionalAction, default=None,
                   help="SmoothQuant MatMul inputs whose outlier channels cost >= 1.5x the layer's error "
                        "(default: on)")
    p.add_argument("--smoothquant-alpha", type=float, help="migration strength alpha in (0, 1) (default 0.5)")
    s = p.add_argument_group("accuracy target (automatic fallback search)")
    s.add_argument("--target-metric", choices=["top1", "agreement", "cosine", "sqnr"],
                   help="built-in metric on --eval data; turns the fallback search on")
    s.add_argument("--evaluator", help="custom metric: path/to/file.py:fn or pkg.mod:fn, fn(model_path) -> float")
    s.add_argument("--eval", help="evaluation data (same formats as --calib)")
    s.add_argument("--labels", help="labels for --target-metric top1 (.npy of ints or one per line)")
    s.add_argument("--max-drop", type=float, help="allowed metric drop from FP32 (default 0.01)")
    s.add_argument("--relative-drop", action="store_true", help="--max-drop is a fraction of the FP32 metric")
    s.add_argument("--min-metric", type=float, help="absolute metric the quantized model must reach")
    s.add_argument("--eval-output", help="graph output the metric reads (default: the first; 'all': the worst "
                                          "output's score, for cosine/sqnr)")
    s.add_argument("--strategy", choices=["gallop", "bisect", "sequential"], default="gallop",
                   help="how many of the ranked layers to keep in float (default: gallop, 1, 2, 4... then bisect)")
    s.add_argument("--ranking", choices=["propagated", "single-op", "end-to-end"], default="propagated",
                   help="how layers are ranked (default: propagated, each layer alone quantized, model outputs "
                        "compared)")
    s.add_argument("--sensitivity-samples", type=int, default=8, help="calibration samples the ranking runs on")
    s.add_argument("--fallback", choices=["auto", "float", "int16"], default="auto",
                   help="int16: try 16-bit activations for the sensitive layers before float; auto (default): "
                        "int16 on --target qnn, float elsewhere (ORT CPU has no fast 16-bit kernels)")
    s.add_argument("--no-give-back", dest="give_back", action="store_false",
                   help="keep the strategy's whole prefix in float (default: re-quantize the layers not needed)")
    s.add_argument("--max-float-fraction", type=float,
                   help="exit 1 when more than this share of the compute layers ends in float (the model and "
                        "report are still written)")


def _run_quantize(args: argparse.Namespace) -> int:
    from .config import QuantConfig
    from .pipeline import quantize

    config = QuantConfig.from_file(args.config) if args.config else QuantConfig()
    overrides = {k: getattr(args, k) for k in ("target", "calib_method", "weight_calib", "percentile", "per_channel",
                                               "max_samples", "batch_size", "activation_bits", "providers",
                                               "threads", "encodings_version", "smoothquant", "smoothquant_alpha")
                 if getattr(args, k) is not None}
    if args.exclude_nodes:
        overrides["exclude_nodes"] = tuple(n for n in args.exclude_nodes.split(",") if n)
    config = config.replace(**overrides)
    if args.target_metric or args.evaluator:
        result = _auto_quantize(args, config)
    else:
        result = quantize(args.model, args.calib, config, output_dir=args.output_dir, name=args.name,
                          calib_spec=args.calib_spec)
    s = result.report["summary"]
    q = s["quantized_tensors"]
    print(f"quantized {result.report['model']['name']}: {q['activation']} activations, {q['weight']} weights, "
          f"{q['bias']} biases on {result.report['calibration']['samples']} calibration samples "
          f"({result.report['calibration']['seconds']:.1f} s); {len(s['float_nodes'])} nodes left in float")
    for key in ("model", "encodings", "report"):
        print(f"  {key:9s} {result.report['outputs'][key]}")
    return 0


def _auto_quantize(args: argparse.Namespace, config):
    from .export import load_module_spec
    from .graph.model_io import load_model
    from .graph.passes import preprocess
    from .search import AccuracyTarget, BuiltinEvaluator, auto_quantize, load_labels

    target = AccuracyTarget(max_drop=0.01 if args.max_drop is None and args.min_metric is None else args.max_drop,
                            relative=args.relative_drop, min_value=args.min_metric)
    if args.evaluator:
        evaluate = load_module_spec(args.evaluator)
    else:
        if not args.eval:
            raise UserError("--target-metric needs evaluation data", "pass --eval DIR (same formats as --calib)")
        float_model = load_model(args.model)
        preprocess(float_model)
        labels = load_labels(args.labels) if args.labels else None
        evaluate = BuiltinEvaluator(args.target_metric, float_model, args.eval, labels, batch_size=config.batch_size,
                                    image_spec=args.calib_spec, output=args.eval_output)
    result = auto_quantize(args.model, args.calib, evaluate, target, config, output_dir=args.output_dir,
                           name=args.name, strategy=args.strategy, sensitivity_samples=args.sensitivity_samples,
                           ranking=args.ranking, fallback=args.fallback, calib_spec=args.calib_spec,
                           give_back_layers=args.give_back, max_float_fraction=args.max_float_fraction)
    search = result.report["search"]
    print(f"accuracy target met: FP32 {search['baseline_metric']:.4f} -> {search['final_metric']:.4f} "
          f"(threshold {search['threshold']:.4f}) with {len(search['fallback_layers'])} layer(s) in "
          f"{search['fallback'] if search['fallback_layers'] else 'float'} after "
          f"{search['full_evaluations']} full evaluations")
    print(f"  {search['float_fraction']:.0%} of the compute layers in float; ranking: {search['ranking_kind']}")
    for layer in search["fallback_layers"]:
        print(f"  {search['fallback']}: {layer['name']} ({layer['op_type']}, {search['ranking_kind']} cosine "
              f"{layer['cosine']:.4f})")
    lat = search.get("latency")
    if lat:
        print(f"  latency (ORT CPU, batch 1): FP32 {lat['fp32_ms']:.2f} ms, all INT8 "
              f"{lat['all_int8_ms'] or float('nan'):.2f} ms, this model {lat['final_ms']:.2f} ms "
              f"({lat['final_vs_fp32']:.2f}x FP32)")
    return result


# --- apply-encodings -------------------------------------------------------------------------------

def _add_apply(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="float ONNX model")
    p.add_argument("encodings", help="AIMET encodings JSON (0.6.1, 1.0.0 or 2.0.0)")
    p.add_argument("-o", "--output", required=True, help="QDQ ONNX file to write")


def _run_apply(args: argparse.Namespace) -> int:
    from .pipeline import apply_encodings

    out = Path(args.output)
    _check_parent(out)
    model = apply_encodings(args.model, args.encodings, out)
    print(f"applied {args.encodings} -> {out} ({len(model.graph.node)} nodes)")
    return 0


def _check_parent(path: Path) -> None:
    from .graph.model_io import ensure_writable_dir

    ensure_writable_dir(path.parent if str(path.parent) else Path("."))


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "export": ("export a PyTorch model to ONNX (simplified, nodes named by module path)", _add_export, _run_export),
    "quantize": ("calibrate and write the QDQ model, encodings and report", _add_quantize, _run_quantize),
    "apply-encodings": ("float model + encodings file -> QDQ model", _add_apply, _run_apply),
    "validate": ("check an ONNX model or PyTorch module before quantizing: findings with fixes; exit 1 on errors",
                 lambda p: _lazy("graph.validate").add_args(p), lambda a: _lazy("graph.validate").run(a)),
    "verify": ("run float and quantized models on real data; exit 1 when a threshold fails",
               lambda p: _lazy("verify").add_arguments(p), lambda a: _lazy("verify").run(a)),
    "batch": ("convert (and verify) many models from a job file, each in its own process",
              lambda p: _lazy("batch").add_arguments(p), lambda a: _lazy("batch").run(a)),
    "analyze": ("where quantization hurts: per-layer sensitivity, errors, histograms -> report.json/.html",
                lambda p: _lazy("analysis.analyzer").add_args(p), lambda a: _lazy("analysis.analyzer").run(a)),
    "compare": ("layer-by-layer MSE/SQNR/cosine of two models sharing tensor names",
                lambda p: _lazy("analysis.compare").add_args(p), lambda a: _lazy("analysis.compare").run(a)),
}


def _lazy(module: str):
    import importlib

    return importlib.import_module(f".{module}", __package__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qconvert", description="ONNX quantization converter")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="converter: %(message)s", stream=sys.stderr)
    try:
        return args._run(args)
    except UserError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

