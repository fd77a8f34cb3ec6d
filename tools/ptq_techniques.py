"""AIMET-style post-training techniques: top-1 of EfficientNet-Lite0 on 900 held-out ImageNet samples (100
calibrate), or of ResNet-8 on 2,000 CIFAR-10 images (200 calibrate) with ``--model resnet8``.

Each row quantizes the same float model from the same calibration images (W8A8 or W4A8, ort-cpu target, minmax)
with one combination of converter's techniques and evaluates the QDQ model in ONNX Runtime CPU
(ORT_ENABLE_ALL: the fused integer kernels). Every quantizing row runs in its own process: its wall time and peak
RSS (``ru_maxrss``, the evaluation images included) are its own.

AIMET rows (``aimet-w4-adaround``, ``aimet-w4``): aimet-onnx's ``apply_adaround`` through tools/aimet_adaround.py,
run with the aimet-onnx venv's python (``--aimet-python``, default /tmp/aimet/bin/python; aimet-onnx pulls a CUDA
torch of ~6 GB, so it is never a project dependency) on the same preprocessed float model, the same calibration
images and the same iteration budget (``--adaround-iterations``); skipped with a note when that python is absent.

    python tools/ptq_techniques.py --assets ../shared/assets [--model efficientnet_lite0|resnet8]
        [--rows fp32,w4-per-channel,w4-per-channel+adaround,aimet-w4-adaround,...] [--adaround-iterations N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import ArrayReader, accuracy, efficientnet_task, resnet8_task  # noqa: E402

import converter  # noqa: E402
from converter import QuantConfig  # noqa: E402
from converter.pipeline import prepare  # noqa: E402

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
    "w4-per-channel+adaround": dict(weight_bits=4, adaround=True),
    "w4-per-channel+adaround+bc": dict(weight_bits=4, adaround=True, bias_correction=True),
    "per-channel+adaround": dict(per_channel=True, adaround=True),
}
AIMET_ROWS = {"aimet-w4-adaround": (4, True), "aimet-w4": (4, False), "aimet-w8-adaround": (8, True)}
TASKS = {"efficientnet_lite0": efficientnet_task, "resnet8": resnet8_task}
DEFAULT_ROWS = "fp32,w4-per-channel,w4-per-channel+bc,w4-per-channel+adaround,w4-per-channel+adaround+bc,aimet-w4-adaround"


def peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def one_row(task, key: str, iterations: int, threads: int, out_dir: Path) -> dict:
    """Quantize and evaluate one converter row (in this process: the parent runs each row in a child)."""
    t = time.perf_counter()
    config = QuantConfig(target="ort-cpu", calib_method="minmax", adaround_iterations=iterations, threads=threads,
                         **ROWS[key])
    result = converter.quantize(task.model, ArrayReader(task.input_name, task.calib), config,
                                output_dir=out_dir / key, name=task.key)
    seconds = time.perf_counter() - t
    report = result.report
    row = {"tool": "converter", "row": key, **accuracy(Path(result.model_path), task), "of": len(task.eval_y),
           "quantize_s": round(seconds, 1), "peak_rss_mb": peak_rss_mb()}
    if "cle" in report:
        row["cle_pairs"] = len(report["cle"]["pairs"])
        row["relu6_replaced"] = len(report["cle"]["relu6_replaced"])
    if "bias_correction" in report:
        row["bias_corrected"] = len(report["bias_correction"]["layers"])
    if "adaround" in report:
        layers = report["adaround"]["layers"]
        row.update(adaround_iterations=iterations, adaround_s=report["adaround"]["seconds"],
                   adaround_layers=len(layers), adaround_kept=sum(r["kept"] for r in layers),
                   loss_nearest_sum=round(sum(r["loss_nearest"] for r in layers), 4),
                   loss_adaround_sum=round(sum(r["loss_adaround"] for r in layers), 4),
                   per_layer=[[r["node"], round(r["loss_nearest"], 5), round(r["loss_adaround"], 5),
                               round(r["seconds"], 1)] for r in layers])
    return row


def aimet_row(task, key: str, args, work: Path) -> dict:
    """AIMET's row through tools/aimet_adaround.py in the aimet-onnx venv, on our preprocessed float model."""
    bits, on = AIMET_ROWS[key]
    model = work / "float_prepared.onnx"
    if not model.exists():
        onnx.save(prepare(str(task.model)).model, model)
        for name, a in (("calib", task.calib), ("eval", task.eval_x), ("labels", task.eval_y)):
            np.save(work / f"{name}.npy", a)
    cmd = [args.aimet_python, str(Path(__file__).parent / "aimet_adaround.py"), "--model", str(model),
           "--calib", str(work / "calib.npy"), "--eval", str(work / "eval.npy"), "--labels", str(work / "labels.npy"),
           "--input", task.input_name, "--weight-bits", str(bits), "--iterations",
           str(args.adaround_iterations if on else 0), "--threads", str(args.threads)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"tool": "aimet-onnx", "row": key, "error": proc.stderr[-2000:]}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.pop("pid", None)
    return {"row": key, **row, "wall_s": round(time.perf_counter() - t, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=os.environ.get("CONVERTER_ASSETS", "../shared/assets"),
                    help="folder with efficientnet-lite0/, imagenet-samples/, cifar10-resnet8/ (default: "
                         "$CONVERTER_ASSETS or ../shared/assets)")
    ap.add_argument("--model", choices=list(TASKS), default="efficientnet_lite0")
    ap.add_argument("--rows", default=DEFAULT_ROWS,
                    help=f"comma-separated rows (default: {DEFAULT_ROWS}; all: fp32, {', '.join(ROWS)}, "
                         f"{', '.join(AIMET_ROWS)})")
    ap.add_argument("--adaround-iterations", type=int, default=1000,
                    help="AdaRound steps per layer, ours and AIMET's alike (default: 1000; AIMET's default 10000)")
    ap.add_argument("--threads", type=int, default=1,
                    help="ORT and torch threads of every row, both tools (default: 1)")
    ap.add_argument("--aimet-python", default="/tmp/aimet/bin/python",
                    help="python of a venv with aimet-onnx, for the aimet-* rows (default: /tmp/aimet/bin/python)")
    ap.add_argument("--json", help="also write the rows to this JSON file (default: none)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this converter row here, print its JSON
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    task = TASKS[args.model](Path(args.assets))
    if args.one:  # progress (AdaRound's per-layer lines) on stderr, which the parent passes through
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
        logging.getLogger("converter").setLevel(logging.DEBUG)
        print(json.dumps(one_row(task, args.one, args.adaround_iterations, args.threads, Path(args.work))), flush=True)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for key in args.rows.split(","):
            if key == "fp32":
                row = {"tool": "onnxruntime", "row": "fp32", **accuracy(task.model, task), "of": len(task.eval_y)}
            elif key in AIMET_ROWS:
                if not Path(args.aimet_python).exists():
                    print(f"{args.aimet_python} not found: no {key} row (install aimet-onnx in a venv there)")
                    continue
                row = aimet_row(task, key, args, Path(d))
            else:
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--assets", args.assets, "--model", args.model,
                                       "--one", key, "--work", d, "--adaround-iterations",
                                       str(args.adaround_iterations), "--threads", str(args.threads)],
                                      stdout=subprocess.PIPE, text=True)
                if proc.returncode != 0:
                    row = {"tool": "converter", "row": key, "error": f"exit status {proc.returncode} (see stderr)"}
                else:
                    row = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                           "wall_s": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
