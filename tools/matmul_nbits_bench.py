"""MiniLM W4 MatMul weights: ours (``--weight-algo rtn|gptq|hqq``) beside ONNX Runtime's ``MatMulNBitsQuantizer``
(RTN, GPTQ, HQQ) from one run.

all-MiniLM-L6-v2 (:func:`tools.benchlib.assets.minilm_task`: calibration on 200 standard-library docstring
sentences, last_hidden_state cosine on 256 STS-B sentences, STS-B Spearman on the 1379 test pairs). Rows:

* ``fp32``;
* ``ours-<algo>-b<B>-wo``: ``converter.quantize``, ort-cpu, W4 blocks of B, ``weight_only`` and no SmoothQuant (activations
  float, as ORT's rows: every weight MatMul runs as MatMulNBits); ``ours-<algo>-b<B>``: the same without ``weight_only``
  (the block-wise MatMuls weight-only, the attention MatMuls on int8 activations); ``ours-<algo>-pc4`` / ``-pc8``:
  per channel (W4A8/W8A8); defaults otherwise (SmoothQuant, minmax); a trailing ``-asym`` (``weight_symmetric: false``:
  uint4 with a zero point per block, all 16 levels) and/or ``-mse`` (``weight_calib: mse``), e.g.
  ``ours-gptq-b32-wo-asym``, the documented MiniLM W4 block-32 setting;
* ``ort-<algo>-b<B>``: ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``, 4-bit blocks of B,
  symmetric for RTN (``DefaultWeightOnlyQuantConfig``), GPTQ (``GPTQWeightOnlyQuantConfig``, the same calibration
  batches, ``percdamp`` 0.01, no act-order), HQQ (``HQQWeightOnlyQuantConfig``); weight-only, activations float.

Each row: cosine, Spearman, size, the time to make it, batch-1 latency (median ms, ORT CPU through the project's
session factory, one thread, the models taking turns) and the ops ORT runs after its graph optimizations
(MatMulNBits and what sits around it).

    nice python -m tools.matmul_nbits_bench --assets DIR --minilm-onnx F [--rows ...] [--runs 50] [--json out.json]
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

from .benchlib import assets_root, compare_latency
from .benchlib.assets import minilm_task
from .benchlib.measure import quantize_any_speed

ROWS = ["fp32", "ours-rtn-b32-wo", "ours-gptq-b32-wo", "ours-hqq-b32-wo", "ort-rtn-b32", "ort-gptq-b32", "ort-hqq-b32"]
EXTRA = ["ours-rtn-b32", "ours-gptq-b32", "ours-hqq-b32", "ours-rtn-pc4", "ours-gptq-pc4", "ours-hqq-pc4", "ours-rtn-pc8",
         "ours-gptq-pc8"]
KEEP_OPS = ("MatMulNBits", "MatMul", "FusedMatMul", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
            "DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape", "Shape")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Reader:
    def __init__(self, batches):
        self.batches, self.it = batches, iter(batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.batches)

    def __iter__(self):  # ORT's GPTQ iterates the reader
        return iter(self.batches)


def ours(model: Path, calib: list, key: str, work: Path) -> Path:
    _, algo, gran, *flags = key.split("-")
    kw = dict(weight_bits=4, weight_block_size=int(gran[1:])) if gran.startswith("b") else dict(weight_bits=int(gran[2:]))
    if "wo" in flags:  # SmoothQuant moves activation outliers into the weights: for activations that stay float, a loss
        kw.update(weight_only=True, smoothquant=False)
    if "asym" in flags:  # uint4 with a zero point per block (weight_symmetric: false): all 16 levels
        kw.update(weight_symmetric=False)
    if "mse" in flags:  # each row's/block's range clipped by the MSE search (weight_calib: mse)
        kw.update(weight_calib="mse")
    r = quantize_any_speed(str(model), calib, QuantConfig(weight_algo=algo, **kw), output_dir=work / key, name="m")
    return Path(r.model_path)


def ort_nbits(model: Path, calib: list, key: str, work: Path) -> Path:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    _, algo, gran = key.split("-")
    block = int(gran[1:])
    if algo == "rtn":
        q = mnq.MatMulNBitsQuantizer(onnx.load(str(model)), bits=4, block_size=block, is_symmetric=True)
    elif algo == "gptq":
        cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(calib), percdamp=0.01, block_size=block,
                                            actorder=False)
        q = mnq.MatMulNBitsQuantizer(str(model), bits=4, block_size=block, algo_config=cfg)
    elif algo == "hqq":
        q = mnq.MatMulNBitsQuantizer(onnx.load(str(model)), bits=4, block_size=block,
                                     algo_config=mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=4))
    else:
        raise SystemExit(f"unknown row {key!r}")
    q.process()
    out = work / f"{key}.onnx"
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", help="assets folder (default: $CONVERTER_ASSETS)")
    ap.add_argument("--minilm-onnx", help="an export of all-MiniLM-L6-v2 (default: the assets' export.py makes one)")
    ap.add_argument("--rows", help=f"comma-separated rows (default: {','.join(ROWS)}; more: {','.join(EXTRA)})")
    ap.add_argument("--runs", type=int, default=50, help="latency rounds (default 50)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for latency (default 1)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = args.rows.split(",") if args.rows else ROWS
    out: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        task = minilm_task(assets_root(args.assets), work, args.minilm_onnx)
        paths: dict[str, Path] = {}
        for key in rows:
            log(f"minilm {key}")
            t = time.perf_counter()
            if key == "fp32":
                path = task.model
            elif key.startswith("ours-"):
                path = ours(task.model, task.calib, key, work)
            elif key.startswith("ort-"):
                path = ort_nbits(task.model, task.calib, key, work)
            else:
                ap.error(f"unknown row {key!r}")
            made = round(time.perf_counter() - t, 1)
            paths[key] = path
            m = task.metrics(str(path))
            row = {"row": key, "cosine": round(m["cosine"], 5), "stsb_spearman": round(m["spearman"], 4),
                   "size_mb": round(path.stat().st_size / 2**20, 2), "make_s": made,
                   "ops": {k: v for k, v in optimized_op_counts(str(path), "extended").items() if k in KEEP_OPS}}
            out.append(row)
            log(json.dumps(row))
        lat = compare_latency(paths, task.feed, runs=args.runs, threads=args.threads)
        for row in out:
            row["latency_ms"] = round(lat[row["row"]], 2)
        for row in out:  # ours against ORT's own model of the same algorithm and blocks, same run
            peer = "ort-" + "-".join(row["row"].split("-")[1:3]) if row["row"].startswith("ours-") else None
            if peer in lat:
                row["latency_vs_ort"] = round(lat[row["row"]] / lat[peer], 3)
    for row in out:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
