"""Minimal reproduction: ONNX Runtime 1.32 computes a 16-bit QDQ MatMul wrongly with graph optimizations on.

The model (built with onnx.helper, opset 21) is what ``--activation-bits 16`` emits for one MatMul::

    x -> QuantizeLinear(uint16) -> DequantizeLinear -> MatMul -> QuantizeLinear(uint16) -> DequantizeLinear -> y
                                DequantizeLinear(int8 W, per-channel axis=1) ---^

x has one large channel (as real activations do); W's row for it is small, so the other 63
channels carry the result. 16-bit activations keep them; 8-bit ones, with a range set by the large
channel, round them away.

ORT 1.32's QDQSelectorActionTransformer (ORT_ENABLE_EXTENDED and above, CPU provider) replaces
DQ(W) + MatMul with com.microsoft.MatMulNBits(bits=8, accuracy_level=4): int8 compute, the 16-bit
input re-quantized to int8 per block of 32 inside the kernel. The session config entry
``session.qdq_matmulnbits_accuracy_level=1`` (fp32 compute; what converter/ort_session.py sets in
every session) keeps the rewrite and gives the unoptimized result back.

    python -m tools.ort_16bit_repro            # whichever onnxruntime this python has
    /tmp/ort131/bin/python -m tools.ort_16bit_repro

Needs only numpy, onnx and onnxruntime (not the converter package), so it runs under any ORT version's venv; it
opens its ORT sessions itself on purpose (the point is what the options without the fix do).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


FIX = {"session.qdq_matmulnbits_accuracy_level": "1"}  # the entry converter/ort_session.py sets
K, N, BATCH = 64, 32, 8


def weights(rng: np.random.Generator) -> np.ndarray:
    w = rng.normal(0, 0.5, (K, N)).astype(np.float32)
    w[0, :] = 1e-3  # the large input channel hardly matters to the result
    return w


def inputs(rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(0, 1, (BATCH, K)).astype(np.float32)
    x[:, 0] *= 300.0
    return x


def build(w: np.ndarray, x_range: float, y_range: float) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(float model, 16-bit QDQ model) for y = x @ w."""
    w_scale = (np.abs(w).max(0) / 127).astype(np.float32)  # per output channel, symmetric int8
    w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
    inits = [numpy_helper.from_array(w_q, "W_q"), numpy_helper.from_array(w_scale, "W_scale"),
             numpy_helper.from_array(np.zeros(N, np.int8), "W_zp")]
    for name, r in (("x", x_range), ("y", y_range)):  # symmetric uint16 around zero point 32768
        inits += [numpy_helper.from_array(np.array(r / 32767, np.float32), f"{name}_scale"),
                  numpy_helper.from_array(np.array(32768, np.uint16), f"{name}_zp")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zp"], ["W_dq"], axis=1),
        helper.make_node("MatMul", ["x_dq", "W_dq"], ["y_f"]),
        helper.make_node("QuantizeLinear", ["y_f", "y_scale", "y_zp"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"]),
    ]
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])])
    qdq = helper.make_model(helper.make_graph(nodes, "matmul_a16w8", *io, inits),
                            opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    fp32 = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul_fp32", *io,
                                               [numpy_helper.from_array(w, "W")]),
                             opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(qdq)
    onnx.checker.check_model(fp32)
    return fp32, qdq


def session(model: onnx.ModelProto, level: ort.GraphOptimizationLevel, config: dict[str, str] | None = None,
            disabled: list[str] | None = None, dump: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = level
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    if dump:
        so.optimized_model_filepath = dump
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled or [])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rewritten_nodes(model: onnx.ModelProto, config: dict[str, str] | None = None) -> str:
    """What the optimized graph made of the MatMul (ORT_ENABLE_ALL dumps are not loadable, so EXTENDED)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session(model, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, config, dump=path)
        opt = onnx.load(path)
    out = []
    for n in opt.graph.node:
        if n.op_type in ("MatMul", "MatMulNBits", "MatMulIntegerToFloat", "QLinearMatMul", "Gemm"):
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute if a.name in ("bits", "accuracy_level")}
            out.append(n.op_type + (f"({', '.join(f'{k}={v}' for k, v in sorted(attrs.items()))})" if attrs else ""))
    return ", ".join(out)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    rng = np.random.default_rng(0)
    w = weights(rng)
    x = inputs(rng)
    ref = x @ w
    fp32, qdq = build(w, float(np.abs(x).max()), float(np.abs(ref).max()))
    L = ort.GraphOptimizationLevel
    assert np.allclose(session(fp32, L.ORT_DISABLE_ALL).run(None, {"x": x})[0], ref, rtol=1e-4, atol=1e-3)
    cases = [
        ("optimizations off (ORT_DISABLE_ALL)", dict(level=L.ORT_DISABLE_ALL)),
        ("ORT_ENABLE_BASIC", dict(level=L.ORT_ENABLE_BASIC)),
        ("ORT_ENABLE_ALL", dict(level=L.ORT_ENABLE_ALL)),
        ("ORT_ENABLE_ALL + fix (qdq_matmulnbits_accuracy_level=1)", dict(level=L.ORT_ENABLE_ALL, config=FIX)),
        ("ORT_ENABLE_ALL, QDQSelectorActionTransformer disabled",
         dict(level=L.ORT_ENABLE_ALL, disabled=["QDQSelectorActionTransformer"])),
    ]
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, numpy {np.__version__}, "
          f"python {sys.version.split()[0]}")
    print(f"16-bit QDQ MatMul [{BATCH}x{K}] @ [{K}x{N}] (uint16 activations, int8 per-channel weights), "
          "output cosine vs FP32:")
    results = {}
    for name, kw in cases:
        results[name] = cosine(session(qdq, **kw).run(None, {"x": x})[0], ref)
        print(f"  {name:<58} {results[name]:.4f}")
    print(f"  the MatMul after ORT_ENABLE_EXTENDED:       {rewritten_nodes(qdq)}")
    print(f"  the MatMul after ORT_ENABLE_EXTENDED + fix: {rewritten_nodes(qdq, FIX)}")
    broken = results[cases[2][0]] < results[cases[0][0]] - 0.001
    fixed = abs(results[cases[3][0]] - results[cases[0][0]]) < 0.001
    print("=> " + ("graph optimizations break this model; " if broken else "graph optimizations keep the result; ")
          + ("with the fix ORT_ENABLE_ALL gives the unoptimized result" if fixed else "THE FIX DOES NOT HELP"))
    return 0 if fixed else 1


if __name__ == "__main__":
    sys.exit(main())
