"""AIMET's CLE row for tools/ptq_techniques.py; runs inside the aimet-onnx venv (``/tmp/aimet/bin/python``).

aimet-onnx's ``equalize_model`` (BatchNorm folding, ReLU6 -> Relu, cross-layer scaling, high-bias fold where it
has the BatchNorms) on the float model, then a ``QuantizationSimModel`` with the default config (per-tensor
int8 weights, 8-bit activations, min-max), encodings computed on the calibration images, top-1 on the evaluation
images. Not a project module: aimet-onnx is not a dependency (a CUDA torch build, ~6 GB).

    /tmp/aimet/bin/python tools/aimet_cle_row.py MODEL.onnx CALIB.npy EVAL.npy LABELS.npy OUT.json [--no-cle]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import onnx


def main() -> int:
    ap = argparse.ArgumentParser()
    for name in ("model", "calib", "eval", "labels", "out"):
        ap.add_argument(name)
    ap.add_argument("--no-cle", action="store_true", help="per-tensor sim without CLE (the baseline row)")
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()
    t0 = time.perf_counter()
    from aimet_onnx.cross_layer_equalization import equalize_model
    from aimet_onnx.quantsim import QuantizationSimModel

    model = onnx.load(args.model)
    calib, x, labels = np.load(args.calib), np.load(args.eval), np.load(args.labels)
    name = model.graph.input[0].name
    t = time.perf_counter()
    if not args.no_cle:
        equalize_model(model)
    cle_s = time.perf_counter() - t
    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme="min_max")
    t = time.perf_counter()
    sim.compute_encodings([{name: calib[i:i + args.batch]} for i in range(0, len(calib), args.batch)])
    calib_s = time.perf_counter() - t
    logits = np.concatenate([sim.session.run(None, {name: x[i:i + args.batch]})[0]
                             for i in range(0, len(x), args.batch)])
    ranked = np.argsort(-logits.reshape(len(x), -1), axis=1)
    out = {"tool": "aimet-onnx", "row": "per-tensor" + ("" if args.no_cle else "+cle(equalize_model)"),
           "top1": int((ranked[:, 0] == labels).sum()), "top5": int((ranked[:, :5] == labels[:, None]).any(1).sum()),
           "of": len(labels), "cle_s": round(cle_s, 1), "calibration_s": round(calib_s, 1),
           "wall_s": round(time.perf_counter() - t0, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
