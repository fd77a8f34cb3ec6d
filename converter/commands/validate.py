"""``qconvert validate``: the findings of converter.validation as a table (and JSON); exit 1 on an error."""

from __future__ import annotations

import argparse
import json

from ..errors import EXIT_CHECK_FAILED, UserError
from ..graph.model_io import atomic_write_text, load_model, save_model
from ..graph.passes import MIN_OPSET, default_opset, upgrade_opset
from ..options import check_output_file
from ..validation.onnx_checks import INFO, Finding, format_table, report, validate_onnx
from .argtypes import parse_shape


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file, or package.module:factory / path/to/file.py:factory of an nn.Module")
    p.add_argument("--input-shape", type=parse_shape, help="example input shape for a PyTorch module, e.g. 1,3,224,224")
    p.add_argument("--target", choices=["ort-cpu", "tensorrt", "qnn"], default="ort-cpu",
                   help="runtime whose rules the model is checked against")
    p.add_argument("--json", help="also write the findings as JSON here (default: none)")
    p.add_argument("--upgrade-opset", action="store_true",
                   help=f"convert an ONNX model to opset {MIN_OPSET} first (written to -o) and validate that")
    p.add_argument("-o", "--output", help="where --upgrade-opset writes the converted model")


def run(args: argparse.Namespace) -> int:
    for path, option in ((args.json, "--json"), (args.output, "-o/--output")):
        if path:  # before the checks run
            check_output_file(path, option, [args.model])
    findings, source = _run_checks(args)
    doc = report(findings, source, args.target)
    print(format_table(findings))
    s = doc["summary"]
    print(f"{'PASSED' if doc['passed'] else 'FAILED'}: {s['errors']} error(s), {s['warnings']} warning(s), "
          f"{s['info']} info ({source}, target {args.target})")
    if args.json:
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n")
    return 0 if doc["passed"] else EXIT_CHECK_FAILED


def _run_checks(args: argparse.Namespace) -> tuple[list[Finding], str]:
    if not _is_onnx_path(args.model):
        if not args.input_shape:
            raise UserError(f"{args.model} is a PyTorch module spec: validating it needs --input-shape",
                            "add --input-shape 1,3,224,224 (the model's input shape)")
        import torch  # deferred: torch loads only for a PyTorch module spec

        from ..export import build_module
        from ..validation.torch_checks import validate_torch

        return validate_torch(build_module(args.model), torch.zeros(args.input_shape), target=args.target), args.model
    if not args.upgrade_opset:
        return validate_onnx(args.model, args.target), args.model
    if not args.output:
        raise UserError("--upgrade-opset needs -o/--output for the converted model", "add -o upgraded.onnx")
    model = load_model(args.model)
    before = default_opset(model)
    upgrade_opset(model, MIN_OPSET)
    save_model(model, args.output)
    findings = validate_onnx(args.output, args.target)
    note = Finding(INFO, "opset-upgraded", "", f"converted from opset {before} to {default_opset(model)}: "
                   f"{args.output}", "quantize the converted model")
    return [note] + findings if before < MIN_OPSET else findings, args.output


def _is_onnx_path(spec: str) -> bool:
    target, sep, factory = spec.rpartition(":")
    if sep and factory and target and (target.endswith(".py") or "/" not in target) and not spec.endswith(".onnx"):
        return False  # pkg.mod:fn or file.py:fn
    return True
