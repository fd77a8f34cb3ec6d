"""``qconvert compare``: layer-by-layer MSE/SQNR/cosine of two models sharing tensor names, as a table."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..analysis.compare import compare_models, comparison_json, format_table, summary_line
from ..ort_session import select_providers
from ..config import PROVIDERS
from ..errors import UserError
from ..graph.model_io import atomic_write_text
from ..options import check_output_file


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("float_model", help="float ONNX model")
    p.add_argument("quant_model", help="quantized (QDQ) ONNX model sharing the float model's tensor names")
    p.add_argument("--data", required=True, help="directory of .npy/.npz files, or images + preprocess.yaml")
    p.add_argument("--image-spec", dest="calib_spec", metavar="YAML",
                   help="image preprocessing spec (default: preprocess.yaml in the data folder)")
    p.add_argument("--calib-spec", dest="calib_spec", help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--json", help="also write the full table as JSON to this file (default: none)")
    p.add_argument("--max-samples", type=int, default=32, help="samples to run")
    p.add_argument("--batch-size", type=int, default=4, help="samples per ONNX Runtime run")
    p.add_argument("--sort", choices=["order", "sqnr"], default="order", help="graph order or worst SQNR first")
    p.add_argument("--top", type=int, default=None, help="print only this many rows (default: all)")
    p.add_argument("--providers", choices=list(PROVIDERS), default="auto",
                   help="execution provider; auto: CUDA if present, else CPU")


def run(args: argparse.Namespace) -> int:
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {args.max_samples}", "use e.g. --max-samples 32")
    if args.json:  # before the models run
        check_output_file(args.json, "--json", [args.float_model, args.quant_model])
    rows = compare_models(args.float_model, args.quant_model, args.data, args.max_samples, args.batch_size,
                          select_providers(args.providers), args.calib_spec)
    print(format_table(rows, args.top, args.sort))
    if args.json:
        out = Path(args.json)
        atomic_write_text(out, comparison_json(rows, args.float_model, args.quant_model))
        print(f"wrote {out}")
    print(summary_line(rows))
    return 0
