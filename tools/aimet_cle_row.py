"""AIMET's CLE row for tools/ptq_techniques.py; runs inside the aimet-onnx venv (``/tmp/aimet/bin/python``).

aimet-onnx's ``equalize_model`` (BatchNorm folding, ReLU6 -> Relu, cross-layer scaling, high-bias fold where it
has the BatchNorms) on the float model, then a ``QuantizationSimModel`` with the default config (per-tensor
int8 weights, 8-bit activations, min-max), encodings computed on the calibration images, top-1 on the evaluation
images. Not a project module: aimet-onnx is not a dependency (a CUDA torch build, ~6 GB).
Standalone: it imports neither ``converter`` nor ``tools`` (and edits no ``sys.path``), so it runs by path
with the venv's python, as below, or as ``/tmp/aimet/bin/python -m tools.aimet_cle_row`` from the repository root.

    /tmp/aimet/bin/python tools/aimet_cle_row.py MODEL.onnx CALIB.npy EVAL.npy LABELS.npy OUT.json [--no-cle]
                                                 [--clip-bounds-as-nodes]

``--clip-bounds-as-nodes``: aimet-onnx 2.42 recognises a ReLU6 (``Clip`` with min 0, which it replaces by ``Relu``
so that CLE can scale through it) only where the Clip's min comes from a ``Constant`` node
(``utils.check_if_clip_node_minimum_is_zero``); EfficientNet-Lite0's export has initializers there, so AIMET leaves
every ReLU6 and equalizes only the pairs without one. This option rewrites those initializers as Constant nodes
first (the function is unchanged), the form AIMET expects.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import onnx


def clip_bounds_as_nodes(model: onnx.ModelProto) -> None:
    """Clip min/max initializers -> Constant nodes placed first (same values, same names)."""
    inits = {t.name: t for t in model.graph.initializer}
    names = {t for n in model.graph.node if n.op_type == "Clip" for t in n.input[1:] if t in inits}
    consts = [onnx.helper.make_node("Constant", [], [t], name=f"{t}/Constant", value=inits[t]) for t in sorted(names)]
    kept = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def main() -> int:
    ap = argparse.ArgumentParser()
    for name in ("model", "calib", "eval", "labels", "out"):
        ap.add_argument(name)
    ap.add_argument("--no-cle", action="store_true", help="per-tensor sim without CLE (the baseline row)")
    ap.add_argument("--clip-bounds-as-nodes", action="store_true",
                    help="Clip min/max initializers as Constant nodes (where AIMET looks for a ReLU6)")
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()
    t0 = time.perf_counter()
    from aimet_onnx.cross_layer_equalization import equalize_model
    from aimet_onnx.quantsim import QuantizationSimModel

    model = onnx.load(args.model)
    calib, x, labels = np.load(args.calib), np.load(args.eval), np.load(args.labels)
    name = model.graph.input[0].name
    if args.clip_bounds_as_nodes:
        clip_bounds_as_nodes(model)
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
    ranked = np.argsort(-logits.reshape(len(x), -1), axis=1, kind="stable")  # ties as argmax breaks them
    row = "per-tensor" + ("" if args.no_cle else "+cle(equalize_model)") + (
        ", Clip bounds as nodes" if args.clip_bounds_as_nodes else "")
    out = {"tool": "aimet-onnx", "row": row,
           "top1": int((ranked[:, 0] == labels).sum()), "top5": int((ranked[:, :5] == labels[:, None]).any(1).sum()),
           "of": len(labels), "cle_s": round(cle_s, 1), "calibration_s": round(calib_s, 1),
           "wall_s": round(time.perf_counter() - t0, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
