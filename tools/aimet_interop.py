"""Do our encodings files load strictly into AIMET, and does AIMET's sim then compute what our QDQ model computes?

For each model (ResNet-8 / CIFAR-10, EfficientNet-Lite0 / ImageNet samples, as in bench_e2e.py), target and
encodings version:

1. ``converter.quantize`` (minmax, per-channel) on the calibration images writes ``<name>.qdq.onnx`` and
   ``<name>.encodings``;
2. **rules check** (no AIMET needed): the file's tensor names against the quantizers an aimet-onnx sim with
   the default config creates (``converter.quant.aimet_rules.aimet_quantizers``): names AIMET has no
   quantizer for (a strict load raises), sim quantizers the file leaves out (strict raises too), and
   AIMET-tied tensors with different encodings (loads, but one encoding silently wins);
3. **with aimet-onnx** (not a project dependency: it pulls a CUDA torch; install it in a separate venv,
   ``python -m venv /tmp/aimet && /tmp/aimet/bin/pip install aimet-onnx``, and run this script with that
   venv's python and ``PYTHONPATH=<repo>``): builds ``QuantizationSimModel`` (default config, i.e.
   ``default_config_per_channel.json``: per-channel int8 weights like our presets, bias quantizers off) on the
   same preprocessed float model, ``load_encodings_to_sim(sim, file, strict=True)``, runs the sim and our QDQ
   model on the evaluation images and prints top-1 of both and their agreement. The sim ties AveragePool/Relu/
   Concat inputs and outputs (AIMET's default, what QNN needs) on targets that tie them (qnn) and not on the
   others (ort-cpu gives AveragePool its own output scale, as ORT runs it).

   Biases: AIMET's sim keeps them float (its float32 QcQuantizeOp cannot simulate int32, see
   ``QuantizationSimModel.fold_param_quantizers``); QNN, ORT and our QDQ models run them int32 (scale = input
   scale x weight scale). That alone moves a few percent of ResNet-8's top-1 decisions (a rounding-level change to
   a bias flips later 8-bit roundings). So the sim runs a second time on the model with AIMET's own int32 bias
   values (from ``to_onnx_qdq(export_int32_bias=True)``), the sim of what is deployed: its agreement is the
   requirement (>= 98%); the float-bias sim's is printed beside it.

   What is left on EfficientNet-Lite0 is AIMET's rounding: libpymo quantizes in the offset domain,
   round((x - min) / scale) in float32, which near a .5 tie differs from ONNX QuantizeLinear's round(x / scale)
   (ours, ORT's). The measured figures: docs/results.md, "AIMET rules".

Without aimet-onnx step 3 prints that it needs it and the exit status is 2 (the rules check still runs).

Usage::

    python -m tools.aimet_interop [--assets DIR] [--models resnet8 efficientnet_lite0] [--targets ort-cpu qnn]
                                  [--versions 1.0.0 0.6.1 2.0.0] [--eval N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from converter import QuantConfig
from converter.config import TARGETS
from converter.graph.index import GraphIndex
from converter.pipeline import prepare
from converter.quant.aimet_rules import (BIASES_IN_FILE, DATA_MOVEMENT_IN_FILE, OUTPUT_NOT_QUANTIZED,
                                         aimet_quantizers, bias_tensors, tie_conflicts)
from converter.quant.encodings_io import read_encodings

from . import bench_e2e
from .benchlib.assets import add_assets_argument, assets_or_exit
from .benchlib.measure import session
from .benchlib.tasks import ROOT
from .benchlib.measure import quantize_any_speed


def aimet_available() -> str | None:
    """None when aimet_onnx imports, else why not."""
    try:
        import aimet_onnx.quantsim  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install (missing CUDA libraries...)
        return f"{type(exc).__name__}: {exc}"
    return None


def rules_check(model: onnx.ModelProto, enc_path: Path) -> dict:
    idx = GraphIndex.build(model)
    enc = read_encodings(enc_path)
    named = set(enc.activations) | set(enc.params)
    acts, params = aimet_quantizers(idx)
    if BIASES_IN_FILE[enc.version]:  # 2.0.0 mirrors the QDQ graph: int32 biases are expected there
        params |= set(bias_tensors(idx)) & named
    if DATA_MOVEMENT_IN_FILE[enc.version]:  # and so are data-movement outputs
        acts |= {o for n in idx.graph.node if n.op_type in OUTPUT_NOT_QUANTIZED for o in n.output} & named
    quantized = {n: e for s in (enc.activations, enc.params) for n, e in s.items() if hasattr(e, "scale")}
    return {"entries": len(named), "sim_quantizers": len(acts | params),
            "unknown_to_aimet": sorted(named - acts - params),
            "sim_quantizers_not_in_file": sorted((acts | params) - named),
            "tie_conflicts": [list(c) for c in tie_conflicts(idx, quantized)]}


def top1(session: ort.InferenceSession, input_name: str, x: np.ndarray, batch: int = 50) -> np.ndarray:
    out = [session.run(None, {input_name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(out).reshape(len(x), -1).argmax(1)


def _sim(model: onnx.ModelProto, activation_bits: int, tie: bool):
    """A default-config sim (``default_config_per_channel.json``: per-channel weights, bias quantizers off);
    ``tie``: AIMET's input/output ties (AveragePool, Relu, Concat...) as QNN needs them, off for a target that gives
    those tensors their own encodings (ort-cpu: ORT's QLinearAveragePool has its own output scale)."""
    from aimet_onnx.quantsim import QuantizationSimModel, _apply_constraints

    with _apply_constraints(tie):
        return QuantizationSimModel(onnx.ModelProto.FromString(model.SerializeToString()), param_type="int8",
                                    activation_type=f"int{activation_bits}", quant_scheme="min_max")


def int32_biases(qdq: onnx.ModelProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each Conv/ConvTranspose/Gemm bias replaced by the values of its int32 DequantizeLinear in
    ``qdq`` (AIMET's ``to_onnx_qdq(export_int32_bias=True)``: scale = input scale x weight scale): AIMET's sim
    keeps biases float (its float32 QcQuantizeOp cannot simulate int32), QNN and our QDQ model run them int32."""
    from onnx import numpy_helper

    inits = {t.name: t for t in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    values = {}
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3:
            continue
        dq = producer.get(node.input[2])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        if q.dtype != np.int32:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        values[node.name] = q.astype(np.float32) * scale  # as DequantizeLinear computes it
    out = onnx.ModelProto.FromString(model.SerializeToString())
    by_name = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.name in values and node.input[2] in by_name:
            by_name[node.input[2]].CopyFrom(numpy_helper.from_array(values[node.name], node.input[2]))
    return out


def aimet_run(model: onnx.ModelProto, enc_path: Path, activation_bits: int, input_name: str, x: np.ndarray,
              tie: bool) -> dict:
    """Strict load into a default-config sim, then its top-1 on ``x``; the same with int32-rounded biases; and
    AIMET's own QDQ export (int32 biases, the graph QNN runs)."""
    from aimet_onnx.quantsim import load_encodings_to_sim

    sim = _sim(model, activation_bits, tie)
    out: dict = {"ties": tie}
    try:
        mismatches = load_encodings_to_sim(sim, str(enc_path), strict=True)
        out["strict_load"] = "ok"
        out["mismatches"] = len(mismatches or [])
    except Exception as exc:
        out["strict_load"] = f"FAILED: {type(exc).__name__}: {str(exc)[:600]}"
        sim = _sim(model, activation_bits, tie)
        load_encodings_to_sim(sim, str(enc_path), strict=False)
        out["loaded_non_strict"] = True
    t = time.perf_counter()
    out["pred"] = top1(sim.session, input_name, x)
    out["sim_s"] = round(time.perf_counter() - t, 1)
    qdq = sim.to_onnx_qdq(export_int32_bias=True)
    out["qdq_pred"] = top1(session(qdq, "off"), input_name, x)
    # the sim once more on the model with AIMET's int32 bias values: what a sim of int32 biases computes
    sim32 = _sim(int32_biases(qdq, model), activation_bits, tie)
    load_encodings_to_sim(sim32, str(enc_path), strict=out["strict_load"] == "ok")
    out["pred_int32_bias"] = top1(sim32.session, input_name, x)
    return out


def aimet_round_trip_200(model: onnx.ModelProto, enc_path: Path, qdq_path: Path, work: Path, tie: bool) -> dict:
    """Our 2.0.0 file -> AIMET's reader (a sim) -> AIMET's 2.0.0 export -> our reader -> apply-encodings: the
    same QDQ bytes as ours? And do the two files name the same tensors with the same values?"""
    from aimet_onnx.quantsim import load_encodings_to_sim

    from converter import apply_encodings

    sim = _sim(model, 8, tie)
    load_encodings_to_sim(sim, str(enc_path), strict=False)
    sim.export(str(work), "aimet", export_model=False, encoding_version="2.0.0")
    theirs, ours = read_encodings(work / "aimet.encodings"), read_encodings(enc_path)
    t = {**theirs.activations, **theirs.params}
    o = {**ours.activations, **ours.params}
    applied = work / "applied_from_aimet.onnx"
    apply_encodings(model, work / "aimet.encodings", applied)
    return {"aimet_only": sorted(set(t) - set(o)), "ours_only": sorted(set(o) - set(t)),
            "values_differ": sorted(n for n in set(t) & set(o) if t[n] != o[n]),
            "apply_of_aimet_export_is_our_qdq": applied.read_bytes() == qdq_path.read_bytes()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_assets_argument(ap)
    ap.add_argument("--models", nargs="+", default=["resnet8", "efficientnet_lite0"],
                    choices=["resnet8", "efficientnet_lite0"])
    ap.add_argument("--targets", nargs="+", default=["ort-cpu", "qnn"], choices=["ort-cpu", "qnn"])
    ap.add_argument("--versions", nargs="+", default=["1.0.0", "0.6.1", "2.0.0"], choices=["1.0.0", "0.6.1", "2.0.0"])
    ap.add_argument("--eval", type=int, default=500, help="evaluation images per model (default: 500)")
    ap.add_argument("--keep", type=Path, help="write the quantized files here (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)

    missing = aimet_available()
    if missing:
        print(f"aimet-onnx is not importable ({missing}).\n"
              "This tool needs aimet-onnx for the strict load and the sim comparison; only the rules check runs.\n"
              "Install it in a separate venv (it pulls a CUDA torch, ~6 GB):\n"
              "  python -m venv /tmp/aimet && /tmp/aimet/bin/pip install aimet-onnx\n"
              f"  cd {ROOT} && PYTHONPATH={ROOT} /tmp/aimet/bin/python -m tools.aimet_interop\n")
    loaders = {"resnet8": bench_e2e.resnet8_task, "efficientnet_lite0": bench_e2e.efficientnet_task}
    results = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="aimet_interop.") as tmp:
        work = args.keep or Path(tmp)
        for key in args.models:
            task = loaders[key](args.assets)
            float_model = prepare(str(task.model)).model  # the model our names refer to (and AIMET's sim is built on)
            x, y = task.eval_x[:args.eval], task.eval_y[:args.eval]
            fp32 = top1(session(float_model, "all"), task.input_name, x)
            for target in args.targets:
                for version in args.versions:
                    out_dir = work / f"{key}-{target}-{version}"
                    calib = [{task.input_name: task.calib[i:i + 16]} for i in range(0, len(task.calib), 16)]
                    res = quantize_any_speed(str(task.model), calib,
                                             QuantConfig(target=target, encodings_version=version),
                                             output_dir=out_dir, name=key)
                    ours = top1(session(res.model_path, "off"), task.input_name, x)  # QDQ as written
                    row = {"model": key, "target": target, "version": version,
                           "fp32_top1": int((fp32 == y).sum()), "ours_top1": int((ours == y).sum()), "n": len(x),
                           "rules": rules_check(float_model, res.encodings_path),
                           "file_report": res.report["encodings_file"]}
                    r = row["rules"]
                    print(f"{key} {target} {version}: {r['entries']} entries, AIMET sim has {r['sim_quantizers']} "
                          f"quantizers; unknown to AIMET {len(r['unknown_to_aimet'])} {r['unknown_to_aimet'][:4]}, "
                          f"sim quantizers not in file {len(r['sim_quantizers_not_in_file'])} "
                          f"{r['sim_quantizers_not_in_file'][:4]}, tie conflicts {len(r['tie_conflicts'])}; "
                          f"top-1 FP32 {row['fp32_top1']}/{len(x)}, ours {row['ours_top1']}/{len(x)}")
                    if not missing and version == "2.0.0":
                        # 2.0.0 names int32 biases, whose quantizers AIMET's default config disables: its own 2.0.0
                        # export fails its strict load too; there the round trip is the check
                        try:
                            rt = aimet_round_trip_200(float_model, res.encodings_path, res.model_path, out_dir,
                                                      tie=bool(TARGETS[target].tied_op_types))
                            row["aimet"] = {"round_trip_200": rt}
                            ok &= rt["apply_of_aimet_export_is_our_qdq"] and not rt["values_differ"]
                        except Exception as exc:
                            row["aimet"] = {"error": f"{type(exc).__name__}: {exc}"}
                            traceback.print_exc()
                            ok = False
                        print(f"    AIMET: {json.dumps(row['aimet'])}")
                    elif not missing:
                        try:
                            a = aimet_run(float_model, res.encodings_path, 8, task.input_name, x,
                                          tie=bool(TARGETS[target].tied_op_types))
                            pred, qdq_pred, pred32 = a.pop("pred"), a.pop("qdq_pred"), a.pop("pred_int32_bias")
                            row["aimet"] = {**a, "sim_top1": int((pred == y).sum()),
                                            "agreement": float((pred == ours).mean()),
                                            "sim_int32_bias_top1": int((pred32 == y).sum()),
                                            "agreement_int32_bias": float((pred32 == ours).mean()),
                                            "aimet_qdq_int32_bias_top1": int((qdq_pred == y).sum()),
                                            "aimet_qdq_agreement": float((qdq_pred == ours).mean())}
                            ok &= row["aimet"]["agreement_int32_bias"] >= 0.98 and a["strict_load"] == "ok"
                        except Exception as exc:
                            row["aimet"] = {"error": f"{type(exc).__name__}: {exc}"}
                            traceback.print_exc()
                            ok = False
                        print(f"    AIMET: {json.dumps(row['aimet'])}")
                    results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'model':18} {'target':7} {'version':7} {'strict':6} {'entries':>7} {'sim top-1 (float b / int32 b)':>29} "
          f"{'ours':>5} {'agreement (float b / int32 b)':>30}  2.0.0 round trip")
    for row in results:
        a, n = row.get("aimet", {}), row["n"]
        sims = (f"{a['sim_top1']}/{n} / {a['sim_int32_bias_top1']}/{n}" if "sim_top1" in a else "-")
        agree = (f"{a['agreement']:.1%} / {a['agreement_int32_bias']:.1%}" if "agreement" in a else "-")
        rt = a.get("round_trip_200")
        rts = "-" if rt is None else ("ok" if rt["apply_of_aimet_export_is_our_qdq"] and not rt["values_differ"]
                                      and not rt["aimet_only"] and not rt["ours_only"] else f"DIFFERS {rt}")
        strict = a.get("strict_load", "-")[:6]
        print(f"{row['model']:18} {row['target']:7} {row['version']:7} {strict:6} {row['rules']['entries']:>7} "
              f"{sims:>29} {row['ours_top1']:>5} {agree:>30}  {rts}")
    if missing:
        print("\naimet-onnx missing: strict load and sim agreement NOT measured (needs aimet-onnx, see above)")
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
