"""``qconvert`` command line: subcommands registered in one table.

Every user error ends as ``error: ...`` / ``fix: ...`` on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from . import __version__
from .config import (BIAS_CORRECTION_MODES, CALIB_METHODS, CLE_RELU6_MODES, ENCODINGS_VERSIONS, PROVIDERS, TARGETS,
                     WEIGHT_ALGOS, WEIGHT_CALIB_METHODS, QuantConfig)
from .errors import UserError
from .options import QDQ_SUFFIX, check_output_file, parse_shape

log = logging.getLogger("converter")
_DEFAULTS = QuantConfig()


class Parser(argparse.ArgumentParser):
    """A usage error (unknown option, invalid choice, missing argument) is one ``error:``/``fix:`` pair, exit 2,
    not a usage block of every option."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message}\n  fix: see '{self.prog} --help'\n")


def versions() -> str:
    """``qconvert X (onnxruntime A, onnx B, torch C, numpy D, python E)``, read without importing torch."""
    from importlib import metadata

    parts = []
    for dist in ("onnxruntime", "onnx", "torch", "numpy"):
        found = None
        for name in ((dist, f"{dist}-gpu") if dist == "onnxruntime" else (dist,)):
            try:
                found = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
        parts.append(f"{dist} {found or 'not installed'}")
    return f"qconvert {__version__} ({', '.join(parts)}, python {sys.version.split()[0]})"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default ("none": not set), unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is argparse.SUPPRESS or action.required
                or isinstance(action, (argparse._VersionAction, argparse._StoreConstAction, argparse._HelpAction))):
            return text
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


# --- export ----------------------------------------------------------------------------------------

def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("module_spec", help="package.module:factory or path/to/file.py:factory returning an nn.Module")
    p.add_argument("--input-shape", type=parse_shape, required=True, help="example input shape, e.g. 1,3,224,224")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write (an existing file only with --force)")
    p.add_argument("--force", action="store_true", help="replace an existing file at -o")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset of the export (default: 18 with the dynamo exporter, its lowest; 17 with "
                        "--exporter torchscript)")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="dynamo: torch.export, the exporter PyTorch maintains (needs onnxscript); torchscript: the "
                        "deprecated TorchScript-based exporter")
    p.add_argument("--static-batch", action="store_true", help="keep the batch dimension fixed")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")


def _run_export(args: argparse.Namespace) -> int:
    import torch

    from .export import build_module, export_torch

    from .errors import OutputError

    out = check_output_file(args.output, "-o/--output")  # before the model is built
    if out.exists() and not args.force:
        raise OutputError(f"-o/--output {out} already exists", "choose another -o, or add --force to replace it")
    module = build_module(args.module_spec)
    export_torch(module, torch.zeros(args.input_shape), out, opset=args.opset,
                 dynamic_batch=not args.static_batch, simplify=not args.no_simplify, exporter=args.exporter)
    print(f"exported {args.module_spec} -> {out} ({args.exporter} exporter)")
    return 0


# --- quantize --------------------------------------------------------------------------------------

def _alpha(text: str) -> float | str:
    """--smoothquant-alpha: ``auto`` or a number (the config checks its range)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1) or auto, got {text!r}") from None


SEARCH_METRICS = ("top1", "top1-agreement", "cosine", "sqnr")
METRIC_ALIASES = {"agreement": "top1-agreement"}  # old spelling -> the one spelling used by every command


_SEARCH_METRIC_KEYS = {"top1-agreement": "agreement"}  # the name converter.search.evaluate.METRICS uses


def _metric_name(text: str) -> str:
    return METRIC_ALIASES.get(text, text)


def _add_custom_op_library(group) -> None:
    group.add_argument("--custom-op-library", action="append", metavar="PATH", default=None,
                       help="shared library with ONNX Runtime custom-op kernels, registered in every session "
                            "(repeatable; config key custom_op_libraries) (default: none)")


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s MODEL --calib DIR -o OUTPUT_DIR [options]  (options by concern below)"
    d = _DEFAULTS
    m = p.add_argument_group("model", "the float model, what is quantized and for which runtime")
    m.add_argument("model", help="float ONNX model")
    m.add_argument("--config", help="YAML/JSON file with QuantConfig keys (command-line options override it)")
    m.add_argument("--target", choices=list(TARGETS),
                   help=f"runtime whose quantization rules are used (default: {d.target})")
    m.add_argument("--exclude-nodes", help="comma-separated node names to keep in float (default: none)")
    dt = p.add_argument_group("data", "calibration data")
    dt.add_argument("--calib", required=True, help="directory of .npy/.npz files, or images + preprocess.yaml")
    dt.add_argument("--image-spec", dest="calib_spec", metavar="YAML",
                   help="image preprocessing spec (default: preprocess.yaml in the data folder)")
    dt.add_argument("--calib-spec", dest="calib_spec", help=argparse.SUPPRESS)  # old spelling
    dt.add_argument("--max-samples", type=int, help="use at most N calibration samples (default: all)")
    dt.add_argument("--batch-size", type=int, help=f"samples per ONNX Runtime run; a larger batch is capped where the model's tensors would "
                         f"take over 1 GiB per run (default: {d.batch_size})")
    c = p.add_argument_group("calibration", "activation ranges")
    c.add_argument("--calib-method", choices=list(CALIB_METHODS),
                   help="activation ranges (per-tensor/op-type overrides: calib_overrides in --config) "
                        f"(default: {d.calib_method})")
    c.add_argument("--percentile", type=float, help=f"for --calib-method percentile (default: {d.percentile})")
    c.add_argument("--activation-bits", type=int, choices=[8, 16],
                   help=f"activation bit width (16 for the qnn target) (default: {d.activation_bits})")
    w = p.add_argument_group("weights", "weight ranges and bit widths")
    w.add_argument("--weight-calib", choices=list(WEIGHT_CALIB_METHODS),
                   help=f"weight ranges per channel: max |w| or the clipping that minimises MSE "
                        f"(default: {d.weight_calib})")
    w.add_argument("--weight-symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="weights symmetric (zero point 0) or, with --no-weight-symmetric, asymmetric per channel "
                        "(unsigned, a zero point each: skewed channels, such as 4-bit depthwise kernels, use every "
                        "level; ort-cpu only) (default: symmetric)")
    g = w.add_mutually_exclusive_group()
    g.add_argument("--per-channel", dest="per_channel", action="store_true", default=None,
                   help="one weight scale per output channel (default)")
    g.add_argument("--per-tensor", dest="per_channel", action="store_false", help="one weight scale per tensor")
    w.add_argument("--weight-bits", type=int,
                   help="weight bit width: 8, or 4 (int4 per channel, packed, ONNX opset 21) "
                        f"(default: {d.weight_bits}); per-layer widths: weight_bits_overrides in --config "
                        "(e.g. {first: 8, last: 8})")
    w.add_argument("--weight-block-size", type=int,
                   help="block-wise weights: one scale per block of 32, 64 or 128 input channels of each output "
                        "channel (ONNX opset 21 blocked DequantizeLinear) for Conv, Gemm and 2-D MatMul weights "
                        "(default: per channel)")
    t = p.add_argument_group("techniques", "passes that change the float model or the weights before the QDQ model is written")
    t.add_argument("--smoothquant", action=argparse.BooleanOptionalAction, default=None,
                   help="SmoothQuant MatMul/Gemm inputs whose outlier channels cost >= 1.5x the layers' error, "
                        "1/s folded into the producing LayerNorm/Mul/MatMul/Gemm where nothing else reads the "
                        "tensor, else a float Mul (default: on)")
    t.add_argument("--smoothquant-alpha", type=_alpha,
                   help="migration strength alpha in (0, 1), or auto: per tensor by the quantized layers' error "
                        "(default: 0.5)")
    t.add_argument("--quantize-subgraphs", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize inside If/Loop/Scan bodies with the main graph's rules (default: on)")
    t.add_argument("--cle", action=argparse.BooleanOptionalAction, default=None,
                   help="cross-layer equalization of Conv->Conv/depthwise chains + high-bias absorption, for "
                        "per-tensor weights (default: off)")
    t.add_argument("--cle-relu6", choices=list(CLE_RELU6_MODES),
                   help="ReLU6 between equalized layers: keep (skip those pairs), min (Relu + per-channel Min, FP32 "
                        "unchanged; ORT runs the Min on uint8) or replace by Relu (FP32 changes; "
                        f"AIMET's way) (default: {d.cle_relu6})")
    t.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="shift each quantized layer's bias so its mean output on calibration data matches FP32 "
                        "(default: off; the cheap --fast-bias-correction is on)")
    t.add_argument("--bias-correction-mode", choices=list(BIAS_CORRECTION_MODES),
                   help="with --bias-correction: empirical (measured on calibration data), analytical (from the "
                        "BatchNorm statistics a layer's input comes from, no data; other layers untouched) or auto "
                        f"(analytical where BatchNorm statistics reach, empirical elsewhere) "
                        f"(default: {d.bias_correction_mode})")
    t.add_argument("--fast-bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="the cheap bias correction of the default: each depthwise Conv's bias shifted by its mean "
                        "output error, measured once on 16 calibration samples; --bias-correction replaces it "
                        f"(default: {'on' if d.fast_bias_correction else 'off'})")
    t.add_argument("--adaround", action=argparse.BooleanOptionalAction, default=None,
                   help="AdaRound: round each Conv/ConvTranspose/Gemm/MatMul weight up or down to reconstruct the "
                        "layer's float output on calibration data, for 4-bit weights above all (default: off)")
    t.add_argument("--adaround-iterations", type=int, metavar="N",
                   help=f"optimization steps per layer for --adaround; 0: none, the local search alone (fast) "
                        f"(default: {d.adaround_iterations})")
    t.add_argument("--adaround-search", action=argparse.BooleanOptionalAction, default=None,
                   help="with --adaround: a greedy local search on each layer's quadratic reconstruction loss after "
                        "the Adam steps; the lowest loss of nearest, AdaRound and the search is kept (default: on)")
    # issue 26: weight_algo
    t.add_argument("--weight-algo", choices=list(WEIGHT_ALGOS),
                   help="how MatMul/Gemm weights are put on their grid: rtn (nearest rounding), gptq (column by column "
                        "against the layer's inputs on calibration data) or hqq (each block's scale and zero point "
                        f"fitted, no data; ort-cpu) (default: {d.weight_algo})")
    t.add_argument("--weight-only", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the weights alone, every activation left in float (with --weight-block-size on "
                        "ort-cpu: every weight MatMul runs as MatMulNBits) (default: off)")

    s = p.add_argument_group("search", "accuracy target: keep the fewest layers in float that meet it (turned on by "
                                       "--target-metric or --evaluator)")
    s.add_argument("--target-metric", type=_metric_name, choices=list(SEARCH_METRICS),
                   help="built-in metric on --eval data (top1-agreement: top-1 agreement with FP32); turns the "
                        "fallback search on")
    s.add_argument("--evaluator", help="custom metric: path/to/file.py:fn or pkg.mod:fn, fn(model_path) -> float; "
                                       "turns the fallback search on")
    s.add_argument("--evaluate", dest="evaluator", help=argparse.SUPPRESS)  # the spelling analyze used
    s.add_argument("--eval", help="evaluation data for --target-metric (same formats as --calib)")
    s.add_argument("--labels", help="labels for --target-metric top1 (.npy of ints or one per line)")
    s.add_argument("--max-drop", type=float, help="allowed metric drop from FP32 (default: 0.01)")
    s.add_argument("--relative-drop", action="store_true", help="--max-drop is a fraction of the FP32 metric")
    s.add_argument("--min-metric", type=float, help="absolute metric the quantized model must reach (default: none)")
    s.add_argument("--eval-output", help="graph output the metric reads (default: the first; 'all': the worst "
                                          "output's score, for cosine/sqnr)")
    s.add_argument("--strategy", choices=["gallop", "bisect", "sequential"], default="gallop",
                   help="how many of the ranked layers to keep in float (default: gallop, 1, 2, 4... then bisect)")
    s.add_argument("--ranking", choices=["propagated", "single-op", "end-to-end", "subset"], default="propagated",
                   help="how layers are ranked (default: propagated, each layer alone quantized, model outputs "
                        "compared)")
    s.add_argument("--sensitivity-samples", type=int, default=8, help="calibration samples the ranking runs on (default: 8)")
    s.add_argument("--fallback", choices=["auto", "float", "int16"], default="auto",
                   help="int16: try 16-bit activations for the sensitive layers before float; auto (default): "
                        "int16 on --target qnn, float elsewhere (ORT CPU has no fast 16-bit kernels)")
    s.add_argument("--no-give-back", dest="give_back", action="store_false",
                   help="keep the strategy's whole prefix in float (default: re-quantize the layers not needed)")
    s.add_argument("--max-float-fraction", type=float,
                   help="exit 1 when more than this share of the compute layers ends in float (the model and "
                        "report are still written) (default: none)")
    s.add_argument("--max-evaluations", type=int, metavar="N",
                   help="budget of full evaluations, FP32 and all-INT8 included; when it ends the search the best "
                        "model so far is kept and the report says so (default: 2 + 4 x ceil(log2 ranked layers))")
    s.add_argument("--max-latency-ratio", type=float, metavar="R",
                   help="a model meeting the target but slower than R x FP32 (ORT CPU, batch 1) exits 1 with the "
                        "accuracy/latency trade-offs found (default: 1.0 on --target ort-cpu for a model whose "
                        "FP32 run takes >= 0.05 ms, none elsewhere)")
    o = p.add_argument_group("output", "what is written where")
    o.add_argument("-o", "--output-dir", required=True,
                   help=f"folder for <name>{QDQ_SUFFIX}, <name>.encodings and <name>.report.json (created if missing)")
    o.add_argument("--name", help="output file stem, a plain file name (default: the model file's stem)")
    o.add_argument("--encodings-version", choices=list(ENCODINGS_VERSIONS),
                   help=f"AIMET encodings file format (default: {d.encodings_version})")
    o.add_argument("--encodings-all-tensors", dest="encodings_all_tensors", action="store_true", default=None,
                   help="also write int32 biases and data-movement outputs into 1.0.0/0.6.1 files, which AIMET's "
                        "strict load rejects (default: only what AIMET quantizes)")
    r = p.add_argument_group("runtime", "ONNX Runtime sessions")
    r.add_argument("--providers", choices=list(PROVIDERS),
                   help=f"execution provider for calibration; auto: CUDA if present, else CPU "
                        f"(default: {d.providers})")
    r.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: 0, ORT decides)")
    _add_custom_op_library(r)
    p.set_defaults(_search_group=s)


def _search_options_without_metric(args: argparse.Namespace) -> list[str]:
    """The search options given although neither --target-metric nor --evaluator turns the search on."""
    if args.target_metric or args.evaluator:
        return []
    return [a.option_strings[0] for a in args._search_group._group_actions
            if a.help != argparse.SUPPRESS and getattr(args, a.dest, None) != a.default]


def _run_quantize(args: argparse.Namespace) -> int:
    from .pipeline import prepare_output_dir, quantize

    stray = _search_options_without_metric(args)
    if stray:
        raise UserError(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} for the accuracy-target search, "
                        "which runs only with --target-metric or --evaluator",
                        "add --target-metric top1|top1-agreement|cosine|sqnr (with --eval DIR), or --evaluator "
                        f"file.py:fn; or drop {', '.join(stray)}")
    config = QuantConfig.from_file(args.config) if args.config else QuantConfig()
    overrides = {k: getattr(args, k) for k in ("target", "calib_method", "weight_calib", "weight_symmetric", "percentile", "per_channel",
                                               "max_samples", "batch_size", "activation_bits", "weight_bits",
                                               "weight_block_size",
                                               "providers", "threads", "encodings_version", "encodings_all_tensors",
                                               "smoothquant", "smoothquant_alpha", "quantize_subgraphs", "cle",
                                               "cle_relu6", "bias_correction", "bias_correction_mode", "fast_bias_correction", "adaround",
                                               "adaround_iterations", "adaround_search", "weight_algo", "weight_only")
                 if getattr(args, k) is not None}
    if args.exclude_nodes:
        overrides["exclude_nodes"] = tuple(n.strip() for n in args.exclude_nodes.split(",") if n.strip())
    if args.custom_op_library:
        overrides["custom_op_libraries"] = config.custom_op_libraries + tuple(args.custom_op_library)
    config = config.replace(**overrides)
    if args.target_metric or args.evaluator:
        prepare_output_dir(args.model, args.calib, args.output_dir, args.name)  # before the evaluator's FP32 runs
        result = _auto_quantize(args, config)
    else:
        result = quantize(args.model, args.calib, config, output_dir=args.output_dir, name=args.name,
                          calib_spec=args.calib_spec)
    s = result.report["summary"]
    q = s["quantized_tensors"]
    print(f"quantized {result.report['model']['name']}: {q['activation']} activations, {q['weight']} weights, "
          f"{q['bias']} biases on {_plural(result.report['calibration']['samples'], 'calibration sample')} "
          f"({result.report['calibration']['seconds']:.1f} s); {_plural(len(s['float_nodes']), 'node')} left in float")
    smoothed = result.report.get("smoothquant") or []
    if smoothed:
        folded = sum(1 for e in smoothed if e["folded_into"])
        print(f"  SmoothQuant: {_plural(len(smoothed), 'input')} smoothed, {folded} folded into their producer, "
              f"{_plural(len(smoothed) - folded, 'Mul')} inserted (report: smoothquant)")
    kernels = s.get("ort_cpu_kernels")
    if kernels:
        quantized = ", ".join(f"{v} {k}" for k, v in kernels["quantized_kernels"].items()) or "none"
        floats = ", ".join(f"{v} {k}" for k, v in kernels["float_layer_ops"].items()) or "none"
        names = kernels.get("float_layer_names") or []
        if names:  # the model's layers it runs in float, by name (a short list)
            floats += ": " + ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        print(f"  ONNX Runtime CPU runs: quantized {quantized}; layers in float: {floats} "
              "(report: summary.ort_cpu_kernels)")
    for line in quality_lines(result.report.get("quality")):
        print(f"  {line}")
    outputs = result.report["outputs"]
    for key, label in (("model", "model"), ("encodings", "encodings"), ("float_model", "prepared"),
                       ("report", "report")):
        if key in outputs:
            print(f"  {label:9s} {outputs[key]}" + ("  (the float model the encodings apply to)"
                                                    if key == "float_model" else ""))
    return 0


def quality_lines(quality: dict | None) -> list[str]:
    """quantize's quality and speed summary (report: quality)."""
    if not quality:
        return []
    outs = quality["outputs"]
    worst = outs[quality["worst_output"]]
    sqnr = "inf" if worst["identical"] else f"{worst['sqnr_db']:.1f}" if worst["sqnr_db"] is not None else "-inf"
    which = f" (worst of {len(outs)} outputs: {quality['worst_output']})" if len(outs) > 1 else ""
    lines = [f"vs FP32 on {_plural(quality['samples'], 'calibration sample')}: output cosine "
             f"{worst['cosine_mean']:.5f} (min {worst['cosine_min']:.5f}), SQNR {sqnr} dB{which} "
             "(report: quality; held-out data: qconvert verify)"]
    lat = quality["latency_batch1"]
    f, q = lat["float"], lat["quant"]
    ratio = (f"x{lat['ratio']:.2f} (median of paired runs)" if lat["ratio"] is not None else
             f"too fast to time (under {lat['too_fast_ms']:g} ms)")
    lines.append(f"latency (ORT CPU, batch 1, median of {lat['runs']}): FP32 {f['median_ms']:.2f} ms "
                 f"(p10-p90 {f['p10_ms']:.2f}-{f['p90_ms']:.2f}), quantized {q['median_ms']:.2f} ms "
                 f"({q['p10_ms']:.2f}-{q['p90_ms']:.2f}): {ratio}")
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _auto_quantize(args: argparse.Namespace, config):
    from .export import load_module_spec
    from .graph.model_io import load_model
    from .graph.passes import preprocess
    from .pipeline import check_node_names
    from .search import AccuracyTarget, BuiltinEvaluator, auto_quantize, load_labels

    target = AccuracyTarget(max_drop=0.01 if args.max_drop is None and args.min_metric is None else args.max_drop,
                            relative=args.relative_drop, min_value=args.min_metric)
    if args.evaluator:
        evaluate = load_module_spec(args.evaluator)
    else:
        if not args.eval:
            raise UserError("--target-metric needs evaluation data", "pass --eval DIR (same formats as --calib)")
        if args.target_metric == "top1" and not args.labels:
            raise UserError("--target-metric top1 needs --labels", "pass --labels FILE, or use --target-metric "
                                                                   "top1-agreement (top-1 agreement with FP32)")
        float_model = load_model(args.model)
        preprocess(float_model)
        check_node_names(float_model, config)  # a typo fails before the FP32 runs on the evaluation data
        labels = load_labels(args.labels) if args.labels else None
        evaluate = BuiltinEvaluator(_SEARCH_METRIC_KEYS.get(args.target_metric, args.target_metric), float_model, args.eval, labels, batch_size=config.batch_size,
                                    image_spec=args.calib_spec, output=args.eval_output)
    result = auto_quantize(args.model, args.calib, evaluate, target, config, output_dir=args.output_dir,
                           name=args.name, strategy=args.strategy, sensitivity_samples=args.sensitivity_samples,
                           ranking=args.ranking, fallback=args.fallback, calib_spec=args.calib_spec,
                           give_back_layers=args.give_back, max_float_fraction=args.max_float_fraction,
                           max_evaluations=args.max_evaluations, max_latency_ratio=args.max_latency_ratio)
    search = result.report["search"]
    print(f"accuracy target met: FP32 {search['baseline_metric']:.4f} -> {search['final_metric']:.4f} "
          f"(threshold {search['threshold']:.4f}) "
          + (f"with {_plural(len(search['fallback_layers']), 'layer')} in {search['fallback']}"
             if search['fallback_layers'] else "with every layer quantized")
          + f" after {_plural(search['full_evaluations'], 'full evaluation')}")
    print(f"  {search['float_fraction']:.0%} of the compute layers in float; ranking: {search['ranking_kind']}")
    c = search.get("evaluation_counts") or {}
    if c:
        print(f"  model runs: {c['full']} full evaluations, {c['subset']} on an item subset, {c['ranking_runs']} "
              f"ranking runs on the sensitivity samples ({c['total']} in all); budget {search['max_evaluations']} "
              "full evaluations (--max-evaluations)")
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

    out = check_output_file(args.output, "-o/--output", [args.model, args.encodings])
    model = apply_encodings(args.model, args.encodings, out)
    print(f"applied {args.encodings} -> {out} ({_plural(len(model.graph.node), 'node')})")
    return 0


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


def _common_options(parser: argparse.ArgumentParser, default) -> None:
    """-v/-q on the main parser and on every subcommand, so they work anywhere on the line."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug logging: stages, timings, chosen providers, files read and written")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


# One spelling per concept across commands: (command, old option) -> the canonical option. The old spelling keeps
# working (hidden from --help); the canonical one is what --help shows and error messages name.
#   --calib DIR       the calibration data (quantize, analyze)
#   --eval DIR        the data a model is evaluated on (quantize's search, analyze, verify, compare)
#   --image-spec YAML the image preprocessing spec of either (hidden: --calib-spec, --data-spec)
#   --evaluator SPEC  a custom metric (hidden: --evaluate)
#   top1-agreement    the metric name (hidden: agreement)
RENAMED_OPTIONS: dict[tuple[str, str], str] = {("verify", "--data"): "--eval", ("compare", "--data"): "--eval"}
SESSION_COMMANDS = ("apply-encodings", "validate", "verify", "analyze", "compare")  # + quantize (in its runtime group)
BATCH_EPILOG = """job file (YAML or JSON; relative paths are relative to the job file's folder):

  defaults: {target: ort-cpu, calib_method: minmax}   QuantConfig keys for every job (as in --config)
  output_dir: out/                                    default: <job file stem>-out/
  timeout: 600                                        seconds per job (default: none)
  jobs:
    - name: digits                                    default: the model file's stem
      model: models/digits.onnx                       an .onnx file, or a PyTorch factory file.py:fn / pkg.mod:fn
      input_shape: [1, 3, 224, 224]                   needed for a PyTorch factory (its example input)
      calib: calib_data/digits/                       calibration data (as quantize --calib)
      image_spec: calib_data/photos/preprocess.yaml   optional (old name: calib_spec)
      config: {per_channel: false}                    QuantConfig keys over the defaults
      verify: {eval: eval_data/digits/, labels: eval_data/digits_labels.txt, min_agreement: 0.98}
      timeout: 120                                    seconds for this job
      num_cpus: 2                                     also memory: 4GiB, num_gpus: 1 (here or in defaults)

verify keys: eval (default: the job's calib folder; old name: data), image_spec (old: data_spec), labels,
min_cosine, min_agreement, max_top1_drop, min_sqnr (null disables one), max_samples, batch_size, providers.
Each job runs in its own process into <output_dir>/<name>/ (outputs, job.log, job.json); --resume skips a
job whose inputs, config and settings hash to its last successful run. Full reference: the README's "Config
and job files" and the converter.batch module docstring."""

# Every threshold and fraction an option takes, checked after parsing: (lowest, highest, what it is). A value
# outside is a usage error (exit 2), not a gate that can never fail or never pass.
OPTION_RANGES: dict[str, tuple[float, float, str]] = {
    "min_agreement": (0.0, 1.0, "a fraction of samples"),
    "min_cosine": (-1.0, 1.0, "a cosine"),
    "max_top1_drop": (0.0, 1.0, "a fraction (0.01 = 1 point)"),
    "max_float_fraction": (0.0, 1.0, "a fraction of the compute layers"),
    "max_drop": (0.0, float("inf"), "a drop (>= 0)"),
    "percentile": (50.0, 100.0, "a percentile in (50, 100]"),
}


def _rename_options(name: str, p: argparse.ArgumentParser) -> None:
    """Apply :data:`RENAMED_OPTIONS` to subcommand ``name``: the old string still parses, only the new one shows."""
    for (command, old), new in RENAMED_OPTIONS.items():
        action = p._option_string_actions.get(old) if command == name else None
        if action is None:
            continue
        action.option_strings = [new if o == old else o for o in action.option_strings]
        p._option_string_actions[new] = action
        if action.metavar is None:
            action.metavar = "DIR"


def _check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for dest, (lo, hi, what) in OPTION_RANGES.items():
        value = getattr(args, dest, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not lo <= value <= hi:
            option = "--" + dest.replace("_", "-")
            bounds = f">= {lo:g}" if hi == float("inf") else f"in [{lo:g}, {hi:g}]"
            parser.exit(2, f"error: {option} {value:g} is out of range: {what}, {bounds}\n"
                           f"  fix: pass {option} {bounds.replace('>= ', 'of at least ')}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qconvert", description="ONNX quantization converter", formatter_class=HelpFormatter)
    parser.add_argument("--version", action=_Version, help="print the versions of qconvert, ONNX Runtime, ONNX, "
                                                               "PyTorch, numpy and Python, and exit")
    _common_options(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                           epilog=BATCH_EPILOG if name == "batch" else None)
        if name == "batch":
            p.formatter_class = _EpilogFormatter
        add(p)
        if name in SESSION_COMMANDS:
            _add_custom_op_library(p.add_argument_group("runtime"))
        _rename_options(name, p)
        for action in p._actions:  # the metric's old name, wherever the canonical one is a choice
            if action.choices and "top1-agreement" in action.choices and action.type is None:
                action.type = _metric_name
        _common_options(p, argparse.SUPPRESS)
        p.set_defaults(_run=run)
    return parser


class _Version(argparse.Action):
    """--version: one unwrapped line (argparse's own version action wraps it to the terminal width)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit(0)


class _EpilogFormatter(HelpFormatter):
    """Keeps the job-file example's lines as written."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


def main(argv: list[str] | None = None) -> int:
    from .graph.model_io import remove_created_dirs

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_ranges(parser, args)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="converter: %(message)s", stream=sys.stderr)
    logging.getLogger("converter").setLevel(level)
    log.debug("qconvert %s %s (python %s)", __version__, args.command, sys.version.split()[0])
    try:
        if getattr(args, "custom_op_library", None):
            from .ort_session import use_custom_op_libraries

            use_custom_op_libraries(args.custom_op_library)
        code = args._run(args)
    except UserError as exc:
        remove_created_dirs()
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        remove_created_dirs()
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout piped into head & co., which stopped reading: not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except BaseException:
        remove_created_dirs()
        raise
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

