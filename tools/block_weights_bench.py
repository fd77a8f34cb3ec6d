"""INT4 weights per channel vs block-wise (32/64/128), beside ONNX Runtime's own 4-bit paths, from one run.

MiniLM (all-MiniLM-L6-v2, as in tools/search_bench.py: calibration on the first 200 distinct STS-B test
sentences, last_hidden_state cosine on the next 200, STS-B Spearman on the test pairs):

* ``fp32``; ``ours-w8`` (W8A8 per channel, for scale); ``ours-w4-pc`` (W4A8 per channel); ``ours-w4-b32/64/128``
  (W4A8 block-wise) -- all ``converter.quantize``, ort-cpu target, minmax, SmoothQuant as by default;
* ``ort-nbits-b32/64/128``: ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` (symmetric
  4-bit, weight-only: MatMul weights to MatMulNBits, activations float; accuracy level default);
* ``ort-qint4-pc``: ``quantize_static`` at opset 21 with ``QuantType.QInt4`` weights, QUInt8 activations, per
  channel, MinMax, the same calibration batches.

EfficientNet-Lite0 (top-1 of 900 held-out ImageNet samples, 100 calibration): fp32, ours W4A8 per channel and
blocks 32/64/128 (Conv blocks: 32 input channels x the kernel), ORT quantize_static QInt4 per channel.

For each row: the metric(s), the model file size, batch-1 latency (median ms, ORT CPU, ORT_ENABLE_ALL, rounds
rotating the models) and the ops ORT runs after its graph optimizations (MatMulNBits, QLinear*, DQ left).

    nice python -m tools.block_weights_bench [--assets DIR] [--minilm-onnx PATH] [--models minilm,effnet]
                                             [--rows ...] [--stsb-pairs N] [--threads 1] [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

from converter import QuantConfig
from converter.ort_session import optimized_op_counts

from .benchlib.assets import STSB, add_assets_argument, assets_or_exit, feeds, stsb_rows, tokenizer
from .benchlib.ort_baseline import ort_quantize_static
from .search_bench import latency  # batch-1 median ms, rotated rounds
from .benchlib.measure import quantize_any_speed


OURS = {
    "ours-w8": dict(weight_bits=8),
    "ours-w4-pc": dict(weight_bits=4),
    "ours-w4-b32": dict(weight_bits=4, weight_block_size=32),
    "ours-w4-b64": dict(weight_bits=4, weight_block_size=64),
    "ours-w4-b128": dict(weight_bits=4, weight_block_size=128),
}
MINILM_ROWS = ["fp32", *OURS, "ort-nbits-b32", "ort-nbits-b64", "ort-nbits-b128", "ort-qint4-pc"]
EFFNET_ROWS = ["fp32", "ours-w4-pc", "ours-w4-b32", "ours-w4-b64", "ours-w4-b128", "ort-qint4-pc"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ort_nbits(model: Path, out: Path, block: int) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(model)), bits=4, block_size=block, is_symmetric=True)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def ort_qint4(model: Path, out: Path, calib: list[dict]) -> Path:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
    m = onnx.load(str(pre))
    if m.opset_import[0].version < 21:
        from onnx import version_converter

        m = version_converter.convert_version(m, 21)
        onnx.save(m, str(pre))
    ort_quantize_static(pre, calib, out, weight_type=QuantType.QInt4)
    return out


def make_row(key: str, model: Path, calib: list[dict], work: Path) -> tuple[Path, dict]:
    t = time.perf_counter()
    info: dict = {}
    if key == "fp32":
        return model, {}
    if key in OURS:
        r = quantize_any_speed(str(model), calib, QuantConfig(**OURS[key]), output_dir=work / key, name="m")
        path = r.model_path
        grans: dict[str, int] = {}
        for w in r.report["summary"]["weights"]:
            grans[f"w{w['bits']}-{w['granularity']}"] = grans.get(f"w{w['bits']}-{w['granularity']}", 0) + 1
        info["weights"] = grans
    elif key.startswith("ort-nbits-b"):
        path = ort_nbits(model, work / f"{key}.onnx", int(key.rsplit("b", 1)[1]))
    elif key == "ort-qint4-pc":
        path = ort_qint4(model, work / f"{key}.onnx", calib)
    else:
        raise SystemExit(f"unknown row {key!r}")
    info["quantize_s"] = round(time.perf_counter() - t, 1)
    return Path(path), info


def optimized_ops(path: Path) -> dict[str, int]:
    """Node counts of the graph ORT CPU runs (extended level: portable, no NCHWc layouts), the kernels that matter."""
    ops = optimized_op_counts(str(path), "extended")
    keep = ("MatMulNBits", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearConv", "QGemm",
            "DequantizeLinear", "QuantizeLinear", "MatMul", "Conv", "FusedConv", "FusedMatMul", "Gemm")
    return {k: v for k, v in ops.items() if k in keep}


def minilm(assets: Path, onnx_path: Path, rows: list[str], work: Path, args) -> list[dict]:
    from converter.search import BuiltinEvaluator

    from .search_bench import _float_proto

    lines = stsb_rows(assets)
    sentences = list(dict.fromkeys(s for r in lines for s in (r[5], r[6])))
    tok = tokenizer(assets, fixed=True)
    calib = [feeds(tok, sentences[i:i + 8]) for i in range(0, 200, 8)]
    cosine = BuiltinEvaluator("cosine", _float_proto(onnx_path), [feeds(tok, sentences[i:i + 25])
                                                                  for i in range(200, 400, 25)])
    stsb = STSB(assets)
    if args.stsb_pairs:
        stsb.gold, stsb.s1, stsb.s2 = stsb.gold[:args.stsb_pairs], stsb.s1[:args.stsb_pairs], stsb.s2[:args.stsb_pairs]
    out, paths = [], {}
    for key in rows:
        log(f"minilm {key}")
        path, info = make_row(key, onnx_path, calib, work / "minilm")
        paths[key] = path
        row = {"model": "minilm", "row": key, "cosine": round(float(cosine(str(path))), 5),
               "stsb_spearman": round(stsb(str(path)), 4), "size_mb": round(path.stat().st_size / 2**20, 2),
               "ops": optimized_ops(path), **info}
        out.append(row)
        log(json.dumps(row))
    lat = latency(paths, feeds(tok, sentences[400:401]), args.threads, args.runs)
    for row in out:
        row["latency_ms"] = lat[row["row"]]
    return out


def effnet(assets: Path, rows: list[str], work: Path, args) -> list[dict]:
    from .bench_e2e import accuracy, efficientnet_task

    task = efficientnet_task(assets)
    calib = [{task.input_name: task.calib[i:i + 16]} for i in range(0, len(task.calib), 16)]
    out, paths = [], {}
    for key in rows:
        if key.startswith("ort-nbits"):
            continue  # MatMulNBits: MatMul only, EfficientNet has none
        log(f"effnet {key}")
        path, info = make_row(key, task.model, calib, work / "effnet")
        paths[key] = path
        row = {"model": "efficientnet_lite0", "row": key, **accuracy(path, task), "of": len(task.eval_y),
               "size_mb": round(path.stat().st_size / 2**20, 2), "ops": optimized_ops(path), **info}
        out.append(row)
        log(json.dumps(row))
    lat = latency(paths, {task.input_name: task.eval_x[:1]}, args.threads, args.runs)
    for row in out:
        row["latency_ms"] = lat[row["row"]]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_assets_argument(ap)
    ap.add_argument("--minilm-onnx", default="/tmp/sb_minilm/minilm.onnx",
                    help="exported MiniLM (tools/search_bench.py exports one with the assets' export.py)")
    ap.add_argument("--models", default="minilm,effnet")
    ap.add_argument("--rows", help="comma-separated rows (default: all for each model)")
    ap.add_argument("--stsb-pairs", type=int, default=0, help="STS-B pairs scored (default 0: all 1379)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for latency (default 1)")
    ap.add_argument("--runs", type=int, default=50, help="latency rounds (default 50)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    assets = Path(args.assets)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for model in args.models.split(","):
            wanted = args.rows.split(",") if args.rows else (MINILM_ROWS if model == "minilm" else EFFNET_ROWS)
            if model == "minilm":
                rows += minilm(assets, Path(args.minilm_onnx), wanted, work, args)
            elif model == "effnet":
                rows += effnet(assets, wanted, work, args)
            else:
                ap.error(f"unknown model {model!r}")
    for r in rows:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
