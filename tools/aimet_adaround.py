"""AIMET's AdaRound on one model, for tools/ptq_techniques.py: runs INSIDE the aimet-onnx venv (not a project
dependency), as a subprocess, and prints one JSON line.
Standalone: it imports neither ``converter`` nor ``tools`` (and edits no ``sys.path``), so it runs by path
with the venv's python, as below, or as ``/tmp/aimet/bin/python -m tools.aimet_adaround`` from the repository root.

    /tmp/aimet/bin/python tools/aimet_adaround.py --model float.onnx --calib calib.npy --eval eval.npy
        --labels labels.npy --input NAME [--weight-bits 4] [--iterations N] [--batch 16] [--threads 1]
        [--weight-scheme min_max|tf_enhanced] [--first-last-bits 8] [--depthwise-bits 8] [--asymmetric-weights]

Flow (aimet-onnx 2.x docs): ``QuantizationSimModel`` (min_max, ``default_config_per_channel.json``: symmetric
per-channel weights, asymmetric 8-bit activations), ``apply_adaround(sim, calib batches, num_iterations)``
(weights frozen), then ``sim.compute_encodings(calib batches)`` for the activations; top-1 of ``sim.session``
on the evaluation images. With ``--iterations 0``: the sim without AdaRound (nearest rounding).
``--weight-scheme tf_enhanced``: the weight quantizers' ranges by AIMET's SQNR search (AIMET's AdaRound default;
ours: ``weight_calib: mse``), activations stay min_max. ``--first-last-bits 8``: the first and the last layer's
weight quantizer at 8 bits (ours: ``weight_bits_overrides: {first: 8, last: 8}``); ``--depthwise-bits 8``: every
depthwise Conv's (ours: ``depthwise: 8`` there). ``--asymmetric-weights``: the
same config with ``params: is_symmetric: False`` (ours: ``weight_symmetric: false``). Wall time and
peak RSS (``ru_maxrss``) of this process are in the line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help=".npy of preprocessed calibration inputs")
    ap.add_argument("--eval", required=True, help=".npy of preprocessed evaluation inputs")
    ap.add_argument("--labels", required=True, help=".npy of int labels for --eval")
    ap.add_argument("--input", required=True, help="the model's input name")
    ap.add_argument("--weight-bits", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=1000, help="AdaRound steps per layer; 0: no AdaRound")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch and ORT threads")
    ap.add_argument("--weight-scheme", default="min_max", choices=("min_max", "tf_enhanced"))
    ap.add_argument("--first-last-bits", type=int, default=0, help="the first and last layer's weight bits (0: as all)")
    ap.add_argument("--depthwise-bits", type=int, default=0, help="every depthwise Conv's weight bits (0: as all)")
    ap.add_argument("--asymmetric-weights", action="store_true", help="param quantizers asymmetric (config file)")
    args = ap.parse_args()

    import numpy as np
    import onnx
    import torch

    torch.set_num_threads(args.threads)
    import aimet_onnx
    from aimet_onnx import apply_adaround
    from aimet_onnx.quantsim import QuantizationSimModel

    t0 = time.perf_counter()
    calib = np.load(args.calib)
    batches = [{args.input: calib[i:i + args.batch]} for i in range(0, len(calib), args.batch)]
    config = Path(aimet_onnx.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json"
    if args.asymmetric_weights:
        import tempfile

        doc = json.loads(config.read_text())
        doc["defaults"]["params"]["is_symmetric"] = "False"
        config = Path(tempfile.mkdtemp()) / "asymmetric_params.json"
        config.write_text(json.dumps(doc))
    sim = QuantizationSimModel(onnx.load(args.model), param_type=f"int{args.weight_bits}", activation_type="int8",
                               quant_scheme="min_max", config_file=str(config),
                               providers=["CPUExecutionProvider"],
                               session_options_kwargs={"intra_op_num_threads": args.threads})
    model = onnx.load(args.model)
    layers = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
              and n.input[1] in sim.qc_quantize_op_dict]
    if args.weight_scheme != "min_max":
        from aimet_onnx.common.defs import QuantScheme

        for w in layers:
            sim.qc_quantize_op_dict[w].set_quant_scheme(QuantScheme.post_training_tf_enhanced)
    if args.first_last_bits and layers:
        for w in (layers[0], layers[-1]):
            sim.qc_quantize_op_dict[w].set_bitwidth(args.first_last_bits)
    if args.depthwise_bits:  # group == input channels (weight (C, 1, kh, kw)), as our weight_bits_overrides depthwise
        inits = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if n.op_type == "Conv" and group > 1 and n.input[1] in layers and inits[n.input[1]].dims[1] == 1:
                sim.qc_quantize_op_dict[n.input[1]].set_bitwidth(args.depthwise_bits)
    t = time.perf_counter()
    if args.iterations:
        apply_adaround(sim, batches, num_iterations=args.iterations)
    adaround_s = time.perf_counter() - t
    sim.compute_encodings(batches)
    quantize_s = time.perf_counter() - t0
    x, y = np.load(args.eval), np.load(args.labels)
    logits = np.concatenate([sim.session.run(None, {args.input: x[i:i + 50]})[0] for i in range(0, len(x), 50)])
    correct = int((logits.reshape(len(x), -1).argmax(1) == y).sum())
    print(json.dumps({"tool": "aimet-onnx " + getattr(aimet_onnx, "__version__", "?"), "top1": correct,
                      "of": len(y), "iterations": args.iterations,
                      "weight_scheme": args.weight_scheme, "first_last_bits": args.first_last_bits,
                      "depthwise_bits": args.depthwise_bits,
                      "asymmetric_weights": args.asymmetric_weights, "adaround_s": round(adaround_s, 1),
                      "quantize_s": round(quantize_s, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "pid": os.getpid()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
