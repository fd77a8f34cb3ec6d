"""``qconvert verify``: float and quantized models on real data against thresholds; exit 1 when one fails."""

from __future__ import annotations

import argparse

from ..config import PROVIDERS
from ..errors import EXIT_CHECK_FAILED, ConfigError
from ..options import check_output_file
from ..verify import AGREEMENT_WITHOUT_LABELS, Thresholds, format_report, verify


def add_args(p: argparse.ArgumentParser) -> None:
    d = Thresholds()
    p.add_argument("float_model", help="the float ONNX model")
    p.add_argument("quant_model", help="the quantized (QDQ) ONNX model")
    p.add_argument("--data", required=True, help="directory of .npy/.npz files, or images + preprocess.yaml")
    p.add_argument("--image-spec", dest="data_spec", metavar="YAML",
                   help="image preprocessing spec (default: preprocess.yaml in the data folder)")
    p.add_argument("--data-spec", dest="data_spec", help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--labels", help=".npy of integers or a text file with one integer per line, in the data's "
                                    "sorted file order")
    p.add_argument("--min-agreement", type=_limit, help=f"min top-1 agreement of [N, C] outputs (default: "
                                                        f"{AGREEMENT_WITHOUT_LABELS} without --labels; with --labels "
                                                        "reported, not gated: the accuracy drop gates; 'none' "
                                                        "disables)")
    p.add_argument("--min-cosine", type=_limit, help=f"min mean cosine of every output (default {d.min_cosine})")
    p.add_argument("--max-top1-drop", type=_limit, help=f"max accuracy drop, needs --labels (default "
                                                        f"{d.max_top1_drop} = 1 point)")
    p.add_argument("--min-sqnr", type=_limit, help="min SQNR in dB of every output (default: not checked)")
    p.add_argument("--providers", choices=list(PROVIDERS), default="auto",
                   help="execution provider; auto: CUDA if present, else CPU")
    p.add_argument("--batch-size", type=int, default=16, help="samples per ONNX Runtime run")
    p.add_argument("--max-samples", type=int, help="use only the first N samples (default: all)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: ORT decides)")
    p.add_argument("--json", help="also write the metrics and checks to this JSON file (default: none)")


def _limit(text: str) -> float | str:
    if text.lower() in ("none", "off"):
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or 'none')") from None


def thresholds_from_args(args: argparse.Namespace) -> Thresholds:
    given = {k: getattr(args, k) for k in ("min_agreement", "min_cosine", "max_top1_drop", "min_sqnr")
             if getattr(args, k) is not None}
    if isinstance(given.get("max_top1_drop"), float) and not args.labels:
        raise ConfigError("--max-top1-drop needs --labels (accuracy cannot be measured without them)",
                          "pass --labels FILE, or drop --max-top1-drop")
    return Thresholds(**{k: None if v == "none" else v for k, v in given.items()})


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise ConfigError("--batch-size and --max-samples must be >= 1", "pass a positive number")
    if args.json:  # before the models run: a bad path fails now, not after the check
        check_output_file(args.json, "--json", [args.float_model, args.quant_model])
    result = verify(args.float_model, args.quant_model, args.data, labels=args.labels,
                    thresholds=thresholds_from_args(args), providers=args.providers, batch_size=args.batch_size,
                    max_samples=args.max_samples, data_spec=args.data_spec, threads=args.threads)
    report = format_report(result)
    if args.json:
        result.write_json(args.json)
        head, _, verdict = report.rpartition("\n")
        report = f"{head}\nwrote {args.json}\n{verdict}"
    print(report)
    return 0 if result.passed else EXIT_CHECK_FAILED
