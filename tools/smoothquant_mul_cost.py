"""What SmoothQuant's float Mul costs where it cannot fold, beside the ops that could replace it.

A post-LN transformer's LayerNorm output feeds both the residual Add and the Q/K/V (or FFN) MatMuls, so
SmoothQuant's ``1 / s`` has no producer to fold into and stays a float ``Mul`` before the QuantizeLinear
(converter/quant/smoothquant.py). Three ways to produce the smoothed uint8 tensor of a (1, T, C) activation, each
a one-node or two-node ONNX model timed alone in ONNX Runtime CPU at batch 1:

* ``QuantizeLinear`` per tensor (no smoothing: the all-INT8 cost);
* ``Mul(1 / s)`` + ``QuantizeLinear`` per tensor (what converter emits);
* ``QuantizeLinear`` with a per-channel scale on the last axis (``scale * s``: the same integers, no Mul).

    python -m tools.smoothquant_mul_cost [--tokens 128] [--channels 384] [--threads 1] [--runs 2000]

No assets needed; sessions with the project's options (``tools.benchlib.session``). Figures: tools/README.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .benchlib.measure import session


def build(kind: str, tokens: int, channels: int) -> bytes:
    rng = np.random.default_rng(0)
    s = (rng.random(channels) + 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp"),
             numpy_helper.from_array((1.0 / s).astype(np.float32), "inv_s"),
             numpy_helper.from_array((0.05 * s).astype(np.float32), "scale_s"),
             numpy_helper.from_array(np.full(channels, 128, np.uint8), "zp_c")]
    if kind == "per-tensor Q":
        nodes, used = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["y"])], {"scale", "zp"}
    elif kind == "Mul + per-tensor Q":
        nodes = [helper.make_node("Mul", ["x", "inv_s"], ["m"]),
                 helper.make_node("QuantizeLinear", ["m", "scale", "zp"], ["y"])]
        used = {"inv_s", "scale", "zp"}
    else:
        nodes = [helper.make_node("QuantizeLinear", ["x", "scale_s", "zp_c"], ["y"], axis=2)]
        used = {"scale_s", "zp_c"}
    shape = [1, tokens, channels]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, shape)],
                              [t for t in inits if t.name in used])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2000)
    args = ap.parse_args()
    x = np.random.default_rng(1).normal(0, 1, (1, args.tokens, args.channels)).astype(np.float32)
    outputs, times = {}, {}
    for kind in ("per-tensor Q", "Mul + per-tensor Q", "per-axis Q"):
        sess = session(build(kind, args.tokens, args.channels), "all", args.threads)
        for _ in range(50):
            outputs[kind] = sess.run(None, {"x": x})[0]
        t = time.perf_counter()
        for _ in range(args.runs):
            sess.run(None, {"x": x})
        times[kind] = (time.perf_counter() - t) / args.runs * 1e6
    same = np.abs(outputs["Mul + per-tensor Q"].astype(int) - outputs["per-axis Q"].astype(int)).max()
    print(f"ONNX Runtime {ort.__version__}, {args.threads} thread(s), activation 1x{args.tokens}x{args.channels}")
    for kind, us in times.items():
        print(f"  {kind:20s} {us:8.1f} us  ({us / times['per-tensor Q']:.1f}x per-tensor Q)")
    print(f"  Mul + Q vs per-axis Q: integers differ by at most {same} (float rounding of x / s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
