"""Do our block-wise (and per-layer-width) encodings load into aimet-onnx, and does its sim compute what our
QDQ model computes?

A small model (MatMul [64, 64] -> Gemm transB -> MatMul [64, 16], and a Conv with 64 input channels) is
quantized with 4-bit block-wise weights (``weight_block_size`` 32), first/last layers at 8 bits, encodings
1.0.0 (``PER_BLOCK``) and 2.0.0 (``y_scale`` with its shape, ``axis``, ``block_size``). Then, in aimet-onnx:

1. a default sim with ``set_blockwise_quantization_for_weights(sim, ("Gemm", "MatMul", "Conv"), 4, True, 32)``,
   our file loaded with ``load_encodings_to_sim(strict=True)``; the mismatches it lists (per-layer widths: the
   sim's weights are all 4 bits; activations AIMET quantizes and our target fuses) are printed;
2. the same file loaded non-strict: the sim's outputs against our QDQ model's in ONNX Runtime (max |diff|);
3. AIMET's own 2.0.0 export of the loaded sim, read by us and applied to the float model: the same bytes as our
   QDQ model?

aimet-onnx is not a project dependency (a CUDA torch build): run this with its venv's python, e.g.
``PYTHONPATH=$PWD /tmp/aimet/bin/python -m tools.aimet_block_check`` from the repository root (the
converter package and tools.benchlib come from PYTHONPATH; nothing edits sys.path). Without aimet-onnx it says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from converter import QuantConfig, apply_encodings
from converter.pipeline import prepare
from converter.quant.encodings_io import read_encodings

from .benchlib.measure import session
from .benchlib.measure import quantize_any_speed

BLOCK = 32


def models() -> dict[str, tuple[onnx.ModelProto, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(2)
    mlp = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B,64] x) => (float[B,16] y) {
      a = MatMul(x, W1)
      b = Relu(a)
      c = Gemm <transB: int = 1> (b, W2, C2)
      d = Relu(c)
      y = MatMul(d, W3)
    }""")
    conv = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B,64,6,6] x) => (float[B,16,6,6] y) {
      h = Conv <pads: ints = [1, 1, 1, 1]> (x, W, Bias)
      y = Relu(h)
    }""")
    inits = [(mlp, dict(W1=rng.normal(0, 0.1, (64, 64)), W2=rng.normal(0, 0.1, (64, 64)), C2=rng.normal(0, 0.1, 64),
                        W3=rng.normal(0, 0.1, (64, 16)))),
             (conv, dict(W=rng.normal(0, 0.1, (16, 64, 3, 3)), Bias=rng.normal(0, 0.1, 16)))]
    for m, values in inits:
        m.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), n) for n, v in values.items())
    return {"mlp": (mlp, {"x": rng.normal(0, 1, (16, 64)).astype(np.float32)}),
            "conv": (conv, {"x": rng.normal(0, 1, (4, 64, 6, 6)).astype(np.float32)})}


def check(label: str, model: onnx.ModelProto, x: dict[str, np.ndarray], version: str, work: Path) -> None:
    from aimet_onnx.quantsim import (QuantizationSimModel, load_encodings_to_sim,
                                     set_blockwise_quantization_for_weights)

    overrides = {"first": 8, "last": 8} if label == "mlp" else {}
    cfg = QuantConfig(target="qnn", weight_bits=4, weight_block_size=BLOCK, weight_bits_overrides=overrides,
                      encodings_version=version)
    r = quantize_any_speed(model, [x], cfg, output_dir=work / f"{label}{version}", name="m")
    float_model = prepare(model).model

    def sim():
        s = QuantizationSimModel(onnx.ModelProto.FromString(float_model.SerializeToString()), param_type="int4",
                                 activation_type="int8", quant_scheme="min_max")
        set_blockwise_quantization_for_weights(s, ("Gemm", "MatMul", "Conv"), 4, True, BLOCK)
        return s

    print(f"== {label}, encodings {version}: weights {[(w['weight'], w['bits'], w['granularity']) for w in r.report['summary']['weights']]}")
    try:
        load_encodings_to_sim(sim(), str(r.encodings_path), strict=True)
        print("  strict load: ok")
    except Exception as exc:  # noqa: BLE001 - AIMET raises AssertionError with the list
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        print(f"  strict load: {type(exc).__name__}: {'; '.join(lines)[:400]}")
    s = sim()
    load_encodings_to_sim(s, str(r.encodings_path), strict=False)
    kinds = {n: (q.bitwidth, q._encoding_type().name) for n, q in s.qc_quantize_op_dict.items()  # noqa: SLF001
             if n in {w["weight"] for w in r.report["summary"]["weights"]}}
    print(f"  non-strict load: weight quantizers {kinds}")
    ys = s.session.run(None, x)[0]
    yq = session(r.model_path, "all").run(None, x)[0]
    print(f"  AIMET sim vs our QDQ model in ORT: max |diff| {float(np.abs(ys - yq).max()):.3g} "
          f"(output max |y| {float(np.abs(yq).max()):.3g})")
    s.export(str(work / f"{label}{version}"), "aimet", export_model=False, encoding_version="2.0.0")
    theirs = read_encodings(work / f"{label}{version}" / "aimet.encodings")
    ours = read_encodings(r.encodings_path)
    t, o = {**theirs.activations, **theirs.params}, {**ours.activations, **ours.params}
    # (a 1.0.0 PER_BLOCK entry reads back flat until applied to the model: compare bit widths and sorted scales)
    differ = sorted(n for n in set(t) & set(o) if getattr(t[n], "bitwidth", 0) != getattr(o[n], "bitwidth", 0)
                    or sorted(getattr(t[n], "scale", ())) != sorted(getattr(o[n], "scale", ())))
    print(f"  AIMET's export vs our file: only AIMET {sorted(set(t) - set(o))}, only ours {sorted(set(o) - set(t))}, "
          f"values differ {differ}")
    blocked = {n: (e.block_size, e.block_shape) for n, e in theirs.params.items() if getattr(e, "blocked", False)}
    applied = work / f"{label}{version}" / "applied.onnx"
    apply_encodings(model, work / f"{label}{version}" / "aimet.encodings", applied)
    print(f"  AIMET's 2.0.0 export: block-wise {blocked}; applied by us == our QDQ model: "
          f"{applied.read_bytes() == r.model_path.read_bytes()}")


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    try:
        import aimet_onnx  # noqa: F401
    except ImportError:
        print("aimet-onnx is not installed in this python: run with its venv (see the docstring)")
        return 2
    with tempfile.TemporaryDirectory() as d:
        for label, (model, x) in models().items():
            for version in ("1.0.0", "2.0.0"):
                check(label, model, x, version, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
