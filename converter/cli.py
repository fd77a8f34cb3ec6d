"""``qconvert`` command line: subcommands registered in one table.

Every user error ends as ``error: ...`` / ``fix: ...`` on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from ._version import __version__
from .config import METRIC_ALIASES, SEARCH_METRICS, WEIGHT_STORAGES, QuantConfig, SearchConfig  # noqa: F401 (SEARCH_METRICS: re-exported)
from .errors import SlowerThanFloatError, UserError
from .commands.argtypes import parse_shape
from .commands.config_flags import add_config_flags, config_from_args  # noqa: F401 (config_from_args: re-exported)
from .options import QDQ_SUFFIX, check_output_file

log = logging.getLogger("converter")


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

# Every QuantConfig / SearchConfig flag comes from its field's option(...) in converter.config (flags, help,
# argparse keywords written once); the groups of quantize --help are the config sections.
SECTION_GROUPS = {
    "target": "the runtime and what is quantized",
    "activations": "activation bit width",
    "weights": "weight ranges and bit widths",
    "calibration": "calibration samples and activation ranges",
    "techniques": "passes that change the float model or the weights before the QDQ model is written",
    "search": "accuracy target: keep the fewest layers in float that meet it (turned on by --target-metric or "
              "--evaluator, or a search: section in --config)",
    "encodings": "the AIMET encodings file",
    "runtime": "ONNX Runtime sessions",
}


def _metric_name(text: str) -> str:
    return METRIC_ALIASES.get(text, text)


def _add_custom_op_library(group) -> None:
    add_config_flags({"runtime": group}, only=("custom_op_libraries",))


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.usage = "%(prog)s MODEL --calib DIR -o OUTPUT_DIR [options]  (options by config section below)"
    m = p.add_argument_group("model", "the float model and the config file")
    m.add_argument("model", help="float ONNX model")
    m.add_argument("--config", help="YAML/JSON file with QuantConfig keys, in sections (weights: {bits: 4}) or "
                                    "flat; a search: section runs the accuracy search (command-line options "
                                    "override it)")
    dt = p.add_argument_group("data", "calibration data")
    dt.add_argument("--calib", required=True, help="directory of .npy/.npz files, or images + preprocess.yaml")
    dt.add_argument("--image-spec", dest="calib_spec", metavar="YAML",
                    help="image preprocessing spec (default: preprocess.yaml in the data folder)")
    dt.add_argument("--calib-spec", dest="calib_spec", help=argparse.SUPPRESS)  # old spelling
    groups = {name: p.add_argument_group(name, text) for name, text in SECTION_GROUPS.items()}
    add_config_flags(groups)
    search_actions = add_config_flags(groups, SearchConfig)
    o = p.add_argument_group("output", "what is written where")
    o.add_argument("-o", "--output-dir", required=True,
                   help=f"folder for <name>{QDQ_SUFFIX}, <name>.encodings and <name>.report.json (created if missing)")
    o.add_argument("--name", help="output file stem, a plain file name (default: the model file's stem)")
    p.set_defaults(_search_actions=search_actions)


def _search_options_without_metric(args: argparse.Namespace, config: QuantConfig) -> list[str]:
    """The search options given although neither --target-metric nor --evaluator (nor a search: section in
    --config) turns the search on."""
    if args.target_metric or args.evaluator or config.search is not None:
        return []
    return [a.option_strings[0] for a in args._search_actions if getattr(args, a.dest, None) is not None]


def _run_quantize(args: argparse.Namespace) -> int:
    from .search import quantize_with_search

    config = QuantConfig.from_file(args.config) if args.config else QuantConfig()
    stray = _search_options_without_metric(args, config)
    if stray:
        raise UserError(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} for the accuracy-target search, "
                        "which runs only with --target-metric or --evaluator",
                        "add --target-metric top1|top1-agreement|cosine|sqnr (with --eval DIR), or --evaluator "
                        f"file.py:fn; or drop {', '.join(stray)}")
    config = config_from_args(args, config)
    try:
        result = quantize_with_search(args.model, args.calib, config, output_dir=args.output_dir, name=args.name,
                                      calib_spec=args.calib_spec)  # an unmet search target: TargetNotMetError, exit 1
    except SlowerThanFloatError as exc:  # written: its summary first, then the gate's error (exit 1)
        _print_quantize_summary(exc.result, config)
        raise
    return _print_quantize_summary(result, config)


def _print_quantize_summary(result, config: QuantConfig) -> int:
    """quantize's summary: the search's verdict, what was quantized, what ORT CPU runs, quality and speed, files."""
    if config.search is not None:
        for line in search_lines(result.report["search"]):
            print(line)
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
    faster = result.report.get("float_where_faster")
    if faster:
        print(f"  {float_where_faster_line(faster)}")
    for line in quality_lines(result.report.get("quality")):
        print(f"  {line}")
    outputs = result.report["outputs"]
    for key, label in (("model", "model"), ("encodings", "encodings"), ("float_model", "prepared"),
                       ("report", "report")):
        if key in outputs:
            print(f"  {label:9s} {outputs[key]}" + ("  (the float model the encodings apply to)"
                                                    if key == "float_model" else ""))
    return 0


def float_where_faster_line(entry: dict) -> str:
    """What float where faster did to an all-INT8 model slower than its limit (report: float_where_faster)."""
    head = f"float where faster (the all-INT8 model ran x{entry['ratio_before']:.2f} FP32's time): "
    if entry.get("skipped"):
        return head + f"not tried: {entry['skipped']}"
    names = entry["float_layers"]
    if not names:
        return head + "no layer runs measurably faster in float (report: float_where_faster)"
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (head + f"{listed} kept in float, x{entry['vs_all_int8']:.2f} the all-INT8 model's time "
            f"({entry['seconds']:.0f} s; report: float_where_faster)")


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


def search_lines(search: dict) -> list[str]:
    """The search's summary (report: search) as quantize prints it."""
    lines = [f"accuracy target met: FP32 {search['baseline_metric']:.4f} -> {search['final_metric']:.4f} "
             f"(threshold {search['threshold']:.4f}) "
             + (f"with {_plural(len(search['fallback_layers']), 'layer')} in {search['fallback']}"
                if search['fallback_layers'] else "with every layer quantized")
             + f" after {_plural(search['full_evaluations'], 'full evaluation')}",
             f"  {search['float_fraction']:.0%} of the compute layers in float; ranking: {search['ranking_kind']}"]
    c = search.get("evaluation_counts") or {}
    if c:
        lines.append(f"  model runs: {c['full']} full evaluations, {c['subset']} on an item subset, "
                     f"{c['ranking_runs']} ranking runs on the sensitivity samples ({c['total']} in all); budget "
                     f"{search['max_evaluations']} full evaluations (--max-evaluations)")
    for layer in search["fallback_layers"]:
        lines.append(f"  {search['fallback']}: {layer['name']} ({layer['op_type']}, {search['ranking_kind']} cosine "
                     f"{layer['cosine']:.4f})")
    lat = search.get("latency")
    if lat:
        lines.append(f"  latency (ORT CPU, batch 1): FP32 {lat['fp32_ms']:.2f} ms, all INT8 "
                     f"{lat['all_int8_ms'] or float('nan'):.2f} ms, this model {lat['final_ms']:.2f} ms "
                     f"({lat['final_vs_fp32']:.2f}x FP32)")
    return lines


# --- apply-encodings -------------------------------------------------------------------------------

def _add_apply(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="float ONNX model")
    p.add_argument("encodings", help="AIMET encodings JSON (0.6.1, 1.0.0 or 2.0.0)")
    p.add_argument("-o", "--output", required=True, help="QDQ ONNX file to write")
    p.add_argument("--weight-storage", choices=list(WEIGHT_STORAGES[1:]), default=None,
                   help="weights below 8 bits (not block-wise): packed, or int8 holding the same integers (default: "
                        "as the quantize report beside the encodings records, else packed)")


def _run_apply(args: argparse.Namespace) -> int:
    from .encodings_file import apply_encodings

    out = check_output_file(args.output, "-o/--output", [args.model, args.encodings])
    model = apply_encodings(args.model, args.encodings, out, args.weight_storage)
    print(f"applied {args.encodings} -> {out} ({_plural(len(model.graph.node), 'node')})")
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "export": ("export a PyTorch model to ONNX (simplified, nodes named by module path)", _add_export, _run_export),
    "quantize": ("calibrate and write the QDQ model, encodings and report", _add_quantize, _run_quantize),
    "apply-encodings": ("float model + encodings file -> QDQ model", _add_apply, _run_apply),
    "validate": ("check an ONNX model or PyTorch module before quantizing: findings with fixes; exit 1 on errors",
                 lambda p: _lazy("commands.validate").add_args(p), lambda a: _lazy("commands.validate").run(a)),
    "verify": ("run float and quantized models on real data; exit 1 when a threshold fails",
               lambda p: _lazy("commands.verify").add_args(p), lambda a: _lazy("commands.verify").run(a)),
    "batch": ("convert (and verify) many models from a job file, each in its own process",
              lambda p: _lazy("commands.batch").add_args(p), lambda a: _lazy("commands.batch").run(a)),
    "analyze": ("where quantization hurts: per-layer sensitivity, errors, histograms -> report.json/.html",
                lambda p: _lazy("commands.analyze").add_args(p), lambda a: _lazy("commands.analyze").run(a)),
    "compare": ("layer-by-layer MSE/SQNR/cosine of two models sharing tensor names",
                lambda p: _lazy("commands.compare").add_args(p), lambda a: _lazy("commands.compare").run(a)),
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

  defaults: {weights: {bits: 8}}                      config keys for every job (as in --config)
  output_dir: out/                                    default: <job file stem>-out/
  timeout: 600                                        seconds per job (default: none)
  jobs:
    - name: digits                                    default: the model file's stem
      model: models/digits.onnx                       an .onnx file, or a PyTorch factory file.py:fn / pkg.mod:fn
      input_shape: [1, 3, 224, 224]                   needed for a PyTorch factory (its example input)
      calib: calib_data/digits/                       calibration data (as quantize --calib)
      image_spec: calib_data/photos/preprocess.yaml   optional (old name: calib_spec)
      config: {weights: {per_channel: false}}         config keys over the defaults
      verify: {eval: eval_data/digits/, labels: eval_data/digits_labels.txt, min_agreement: 0.98}
      search: {metric: top1, eval: eval_data/digits/, labels: eval_data/digits_labels.txt, max_drop: 0.01}
                                                      the accuracy search (as a search: section in --config)
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

