"""All-INT8 (default config) accuracy and latency on the asset models: what the math-recognised blocks and the
float-tail rule change. Run it once from the root of each checkout (each measures its own converter) and
compare::

    cd /path/to/before && PYTHONPATH=$PWD python -m tools.blocks_bench --json /tmp/before.json
    cd /path/to/after && PYTHONPATH=$PWD python -m tools.blocks_bench --json /tmp/after.json

Per model: the asset's accuracy metric vs FP32 (tools/assets_smoke.py: EfficientNet-Lite0 top-1 on 900 held-out
images, ResNet-8 top-1, MiniLM embedding cosine / Spearman, PP-OCRv4 exact lines / CER), the bundled digits
detector's class-score agreement
and score error, then the QDQ model's QuantizeLinear count, the Conv/MatMul/Gemm ORT runs on integers
(QLinearConv/QLinearMatMul/QGemm/MatMulIntegerToFloat in its optimised graph), the blocks the plan kept whole, the
nodes the float-tail rule left float, and batch-1 latency (1 thread, ORT_ENABLE_ALL, median of interleaved runs)
as a ratio to FP32 measured in the same loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

from converter import QuantConfig

from . import assets_smoke as smoke
from .benchlib.assets import add_assets_argument, assets_or_exit
from .benchlib.measure import compare_latency
from .benchlib.measure import session as bench_session
from .benchlib.tasks import load_models_module
from .benchlib.measure import quantize_any_speed


INT_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger")
FLOAT_COMPUTE = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm")


def session(path, threads: int = 1, optimized: str | None = None) -> ort.InferenceSession:
    return bench_session(path, "all", threads, save_optimized=optimized)


def latency(fp32: ort.InferenceSession, q: ort.InferenceSession, feed: dict, runs: int) -> dict:
    """``tools.benchlib`` timer: 5 warm-up runs each, then ``runs`` rounds, the order rotated round by round."""
    ms = compare_latency({"fp32": fp32, "int8": q}, feed, runs, warmup=5)
    f, qq = ms["fp32"], ms["int8"]
    return {"fp32_ms": round(f, 3), "int8_ms": round(qq, 3), "ratio": round(qq / f, 3)}


def detector(n_eval: int):
    import torch

    mod = load_models_module("digits_detector")

    from converter import export_torch

    path = Path(os.environ["DETECTOR_ONNX"]) if os.environ.get("DETECTOR_ONNX") else \
        Path(tempfile.mkdtemp()) / "detector.onnx"
    if not os.environ.get("DETECTOR_ONNX"):  # else: another detector with the same input/output (a SiLU/DFL variant)
        export_torch(mod.build(), torch.zeros(mod.INPUT_SHAPE), path)
    x_cal, _ = mod.make_data(64, seed=10)
    x_eval, _ = mod.make_data(n_eval, seed=11)
    calib = [{mod.INPUT_NAME: x_cal[i:i + 16]} for i in range(0, len(x_cal), 16)]
    agreement = mod.ScoreAgreement(str(path), x_eval)

    def evaluate(fp32, q_path):
        out = agreement.outputs(str(q_path))
        return {"class_agreement": round(agreement.score(out), 4),
                **{k: (round(v, 4) if isinstance(v, float) else v)
                   for k, v in mod.score_resolution(out, agreement.reference).items()}}
    return path, calib, evaluate, {"by_path": True}


MODELS = {
    "efficientnet-lite0": lambda assets, n: smoke.effnet(assets, n or 900),
    "resnet8": lambda assets, n: smoke.ASSETS["resnet8"](assets, n or 500),
    "minilm": lambda assets, n: smoke.minilm(assets, n or 300),
    "digits-detector": lambda assets, n: detector(n or 200),
    "ppocr-rec": lambda assets, n: smoke.ppocr_rec(assets, n or 100),
}


def run_model(name: str, assets: Path, n_eval: int, runs: int, work: Path) -> dict:
    path, calib, evaluate, opts = MODELS[name](assets, n_eval)
    res = quantize_any_speed(str(path), calib, QuantConfig(), output_dir=work, name="q")
    qpath = work / "q.qdq.onnx"
    fp32, q = session(path), session(qpath, optimized=str(work / "opt.onnx"))
    ops = Counter(n.op_type for n in onnx.load(str(work / "opt.onnx")).graph.node)
    acc = evaluate(fp32, qpath) if opts.get("by_path") else evaluate(fp32, q)
    feed = {k: v[:1] for k, v in calib[0].items()}
    plan = res.plan
    return {
        "model": name, "accuracy": acc,
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in res.model.graph.node),
        "int_kernels": sum(ops[k] for k in INT_KERNELS), "float_compute": sum(ops[k] for k in FLOAT_COMPUTE),
        "blocks": dict(Counter(p["kind"] for p in plan.patterns if not p["qdq_inside"])),
        "float_tail": len(getattr(plan, "float_tail", [])),
        "latency": latency(fp32, q, feed, runs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_assets_argument(ap)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--n-eval", type=int, default=0, help="held-out items (default: 900/500x4/300/200 per model)")
    ap.add_argument("--runs", type=int, default=100, help="interleaved latency rounds (default 100)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    import converter

    print(f"converter from {Path(converter.__file__).parent}", flush=True)
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as d:
            row = run_model(name, args.assets, args.n_eval, args.runs, Path(d))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
