"""A small classifier for scikit-learn's 8x8 digits, written as ONNX the way jax2tf -> tf2onnx writes a flax model.

Use: ``model, (x_test, y_test), x_calib = build()``. Trains with torch (deterministic, ~2-5 s on CPU), then writes
the graph by hand in the exporter's idiom, so every LayerNorm and GELU arrives decomposed:

* LayerNorm as flax computes it (``use_fast_variance``): ``mean = ReduceSum(x) * 1/N``, ``E[x^2] = ReduceSum(x * x)
  * 1/N``, ``var = Max(E[x^2] - mean * mean, 0)``, ``rsqrt(var + eps)`` as ``Sqrt`` + ``Reciprocal`` (tf2onnx's
  Rsqrt), ``* scale``, ``(x - mean) * that + bias``;
* GELU in its tanh form with ``x**3`` as ``x * (x * x)`` (jax's integer_pow):
  ``x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))))``;
* Dense as ``MatMul`` + ``Add(bias)``.

Data: ``sklearn.datasets.load_digits()`` (1797 real handwritten digits), x = pixel / 16 flattened to 64; the first
1200 train, the other 597 are held out. Network: Dense(64->96) LN, an MLP block Dense(96->192) GELU Dense(192->96),
LN, Dense(96->10).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

N_TRAIN = 1200
HIDDEN = 96
EPS = 1e-6


def data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def train(x: np.ndarray, y: np.ndarray, seed: int = 0, steps: int = 400) -> dict[str, np.ndarray]:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    net = nn.Sequential(nn.Linear(64, HIDDEN), nn.LayerNorm(HIDDEN, eps=EPS), nn.Linear(HIDDEN, 2 * HIDDEN),
                        nn.GELU(approximate="tanh"), nn.Linear(2 * HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN, eps=EPS),
                        nn.Linear(HIDDEN, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
        opt.step()
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    return {"w0": sd["0.weight"].T, "b0": sd["0.bias"], "s1": sd["1.weight"], "o1": sd["1.bias"],
            "w2": sd["2.weight"].T, "b2": sd["2.bias"], "w4": sd["4.weight"].T, "b4": sd["4.bias"],
            "s5": sd["5.weight"], "o5": sd["5.bias"], "w6": sd["6.weight"].T, "b6": sd["6.bias"]}


def to_onnx(p: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits = {k: numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in p.items()}

    def const(name: str, value) -> str:
        if name not in inits:
            arr = np.asarray(value)
            inits[name] = numpy_helper.from_array(arr.astype(np.int64 if arr.dtype.kind == "i" else np.float32), name)
        return name

    def op(op_type: str, *inputs: str, **attrs) -> str:
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"jax2tf/{op_type}_{len(nodes)}", **attrs))
        return out

    def dense(x: str, w: str, b: str) -> str:
        return op("Add", op("MatMul", x, w), b)

    def layernorm(x: str, scale: str, bias: str) -> str:
        axes, inv_n = const("axes", [-1]), const("inv_n", 1.0 / HIDDEN)
        mean = op("Mul", op("ReduceSum", x, axes, keepdims=1), inv_n)
        mean2 = op("Mul", op("ReduceSum", op("Mul", x, x), axes, keepdims=1), inv_n)
        var = op("Max", op("Sub", mean2, op("Mul", mean, mean)), const("zero", 0.0))
        rsqrt = op("Reciprocal", op("Sqrt", op("Add", var, const("eps", EPS))))
        return op("Add", op("Mul", op("Sub", x, mean), op("Mul", rsqrt, scale)), bias)

    def gelu(x: str) -> str:
        cube = op("Mul", x, op("Mul", x, x))
        inner = op("Mul", op("Add", x, op("Mul", cube, const("c_cube", 0.044715))),
                   const("c_sqrt", math.sqrt(2.0 / math.pi)))
        cdf = op("Mul", op("Add", op("Tanh", inner), const("one", 1.0)), const("half", 0.5))
        return op("Mul", x, cdf)

    h = layernorm(dense("input", "w0", "b0"), "s1", "o1")
    h = layernorm(dense(gelu(dense(h, "w2", "b2")), "w4", "b4"), "s5", "o5")
    logits = dense(h, "w6", "b6")
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="jax2tf/Identity_out"))
    graph = helper.make_graph(nodes, "jax2tf_digits_mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              list(inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8,
                              producer_name="tf2onnx")
    onnx.checker.check_model(model)
    return model


def build(seed: int = 0, steps: int = 400) -> tuple[onnx.ModelProto, tuple[np.ndarray, np.ndarray], np.ndarray]:
    """(model, (held-out x, labels), calibration x: 64 training samples)."""
    x, y = data()
    params = train(x[:N_TRAIN], y[:N_TRAIN], seed, steps)
    return to_onnx(params), (x[N_TRAIN:], y[N_TRAIN:]), x[:64]


if __name__ == "__main__":
    import onnxruntime as ort

    model, (xt, yt), _ = build()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"input": xt})[0].argmax(1)
    print(f"held-out accuracy {float((pred == yt).mean()):.4f} on {len(yt)} digits")
