"""AIMET-style post-training techniques on EfficientNet-Lite0: top-1 on 900 held-out ImageNet samples.

Each row quantizes the same float model from the same 100 calibration images (W8A8 or W4A8, ort-cpu target, minmax)
with one combination of converter's techniques and evaluates the QDQ model in ONNX Runtime CPU
(ORT_ENABLE_ALL: the fused integer kernels). AIMET rows are not implemented: aimet-onnx is not installed here (a
~6 GB download with its CUDA torch build); the script only says whether ``aimet_onnx`` imports.

    python tools/ptq_techniques.py --assets ../shared/assets [--rows fp32,per-tensor,per-tensor+cle,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import ArrayReader, accuracy, efficientnet_task  # noqa: E402

import converter  # noqa: E402
from converter import QuantConfig  # noqa: E402

ROWS = {
    "per-tensor": dict(per_channel=False),
    "per-tensor+cle": dict(per_channel=False, cle=True, cle_relu6="min"),
    "per-tensor+cle(replace-relu6)": dict(per_channel=False, cle=True, cle_relu6="replace"),
    "per-tensor+cle(keep-relu6)": dict(per_channel=False, cle=True, cle_relu6="keep"),
    "per-tensor+bc": dict(per_channel=False, bias_correction=True),
    "per-tensor+cle+bc": dict(per_channel=False, cle=True, cle_relu6="min", bias_correction=True),
    "per-tensor+cle(keep-relu6)+bc": dict(per_channel=False, cle=True, cle_relu6="keep", bias_correction=True),
    "per-channel": dict(per_channel=True),
    "per-channel+bc": dict(per_channel=True, bias_correction=True),
    "w4-per-channel": dict(weight_bits=4),
    "w4-per-channel+bc": dict(weight_bits=4, bias_correction=True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=os.environ.get("CONVERTER_ASSETS", "../shared/assets"),
                    help="folder with efficientnet-lite0/ and imagenet-samples/ (default: $CONVERTER_ASSETS or "
                         "../shared/assets)")
    ap.add_argument("--rows", default="fp32," + ",".join(ROWS),
                    help="comma-separated rows to run (default: all: fp32," + ",".join(ROWS) + ")")
    ap.add_argument("--json", help="also write the rows to this JSON file (default: none)")
    args = ap.parse_args()
    task = efficientnet_task(Path(args.assets))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for key in args.rows.split(","):
            t = time.perf_counter()
            if key == "fp32":
                path, report = task.model, {}
            else:
                config = QuantConfig(target="ort-cpu", calib_method="minmax", **ROWS[key])
                result = converter.quantize(task.model, ArrayReader(task.input_name, task.calib), config,
                                            output_dir=Path(d) / key, name=task.key)
                path, report = result.model_path, result.report
            seconds = time.perf_counter() - t
            acc = accuracy(Path(path), task)
            row = {"tool": "converter", "row": key, **acc, "of": len(task.eval_y), "quantize_s": round(seconds, 1)}
            if "cle" in report:
                row["cle_pairs"] = len(report["cle"]["pairs"])
                row["relu6_replaced"] = len(report["cle"]["relu6_replaced"])
            if "bias_correction" in report:
                row["bias_corrected"] = len(report["bias_correction"]["layers"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    try:
        import aimet_onnx  # noqa: F401
    except ImportError:
        print("aimet-onnx not importable: no AIMET rows")
    else:
        print("aimet-onnx imports, but its rows (equalize_model) are not implemented in this script yet")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
