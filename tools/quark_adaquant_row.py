"""AMD Quark's AdaQuant on one model, for tools/ptq_techniques.py: runs INSIDE a venv with amd-quark (not a project
dependency; see tools/README.md), as a subprocess, and prints one JSON line (as tools/aimet_adaround.py does).

    /work/peers/quark/bin/python -m tools.quark_adaquant_row --model float.onnx --calib calib.npy --eval eval.npy
        --labels labels.npy --input NAME [--weight-bits 8|4] [--iterations 1000] [--batch 16] [--threads 1]
        [--first-last-bits 8]

Flow (Quark ONNX ``QConfig`` API): ``QLayerConfig(activation=UInt8 asymmetric per-tensor MinMax, weight=Int8
symmetric per-channel MinMax)``, ``AdaQuantConfig(num_iterations, learning_rate=1e-5 (Quark's default),
batch_size)`` as its one algorithm, ``ModelQuantizer(config).quantize_model(model, out, reader)`` over the
calibration images; top-1 of the QDQ model in ONNX Runtime CPU on the evaluation images.

``--weight-bits 4``: per-channel 4-bit weights, asked of Quark as ONNX Runtime spells it (``TensorQuantOverrides``,
``quant_type: QInt4`` per weight; ``--first-last-bits 8`` leaves the first and last layer at 8 bits). Quark ONNX
0.13's data types stop at 8 bits (Int8/UInt8/Int16/UInt16/Int32/UInt32, float16/bfloat16, BFP/MX) and its fast
finetune's range table has no INT4, so the row reports what Quark answered: the quantized model's weight types,
or the exact error. Wall time and peak RSS (``ru_maxrss``) of this process are in the line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
import traceback
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help=".npy of preprocessed calibration inputs")
    ap.add_argument("--eval", required=True, help=".npy of preprocessed evaluation inputs")
    ap.add_argument("--labels", required=True, help=".npy of int labels for --eval")
    ap.add_argument("--input", required=True, help="the model's input name")
    ap.add_argument("--weight-bits", type=int, default=8, choices=(4, 8))
    ap.add_argument("--iterations", type=int, default=1000, help="AdaQuant steps per layer; 0: no AdaQuant")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch and ORT threads")
    ap.add_argument("--first-last-bits", type=int, default=0, help="the first and last layer's weight bits (0: as all)")
    args = ap.parse_args()

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    import quark
    from onnxruntime.quantization import CalibrationDataReader, QuantType
    from quark.onnx import AdaQuantConfig, ModelQuantizer, QConfig, QLayerConfig
    from quark.onnx.quantization.config.spec import CalibMethod, Int8Spec, QuantGranularity, UInt8Spec

    t0 = time.perf_counter()
    calib = np.load(args.calib)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{args.input: calib[i:i + args.batch]} for i in range(0, len(calib), args.batch)])

        def get_next(self):
            return next(self.batches, None)

    model = onnx.load(args.model)
    weights = [n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1
               and any(t.name == n.input[1] for t in model.graph.initializer)]
    extra = {"ForceQuantizeNoInputCheck": True, "AlignSlice": False, "FoldRelu": True, "AlignConcat": True}
    if args.weight_bits == 4:
        wide = set((weights[0], weights[-1])) if args.first_last_bits == 8 and weights else set()
        extra["TensorQuantOverrides"] = {w: [{"quant_type": QuantType.QInt4, "symmetric": True}]
                                         for w in weights if w not in wide}
    config = QConfig(
        global_config=QLayerConfig(
            activation=UInt8Spec(calibration_method=CalibMethod.MinMax),
            weight=Int8Spec(calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Channel)),
        algo_config=[AdaQuantConfig(num_iterations=args.iterations, learning_rate=1e-5, batch_size=args.batch,
                                    data_size=len(calib))] if args.iterations else [],
        extra_options=extra)
    out = Path(tempfile.mkdtemp()) / "quark_adaquant.onnx"
    row = {"tool": "amd-quark " + getattr(quark, "__version__", "?"), "weight_bits": args.weight_bits,
           "first_last_bits": args.first_last_bits, "iterations": args.iterations, "batch": args.batch}
    try:
        ModelQuantizer(config).quantize_model(args.model, str(out), Reader())
    except BaseException as exc:  # noqa: BLE001 - the peer's own failure is the row's result
        lines = traceback.format_exception(exc)
        row.update(error=f"{type(exc).__name__}: {exc}"[:400], where=lines[-2].strip()[:300] if len(lines) > 1 else "",
                   quantize_s=round(time.perf_counter() - t0, 1),
                   peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), pid=os.getpid())
        print(json.dumps(row), flush=True)
        return 0
    quantize_s = time.perf_counter() - t0
    q = onnx.load(str(out))
    inits = {t.name: t for t in q.graph.initializer}
    types: dict[str, int] = {}
    for n in q.graph.node:  # the weights' quantized types, as written (DQ of an initializer)
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 4:
            name = onnx.TensorProto.DataType.Name(inits[n.input[0]].data_type)
            types[name] = types.get(name, 0) + 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    x, y = np.load(args.eval), np.load(args.labels)
    logits = np.concatenate([sess.run(None, {args.input: x[i:i + 50]})[0] for i in range(0, len(x), 50)])
    correct = int((logits.reshape(len(x), -1).argmax(1) == y).sum())
    row.update(top1=correct, of=len(y), weight_types=types, quantize_s=round(quantize_s, 1),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), pid=os.getpid())
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
