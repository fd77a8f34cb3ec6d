"""AIMET-style post-training techniques on EfficientNet-Lite0: top-1 on 900 held-out ImageNet samples, beside AIMET.

Each row quantizes the same float model from the same 100 calibration images (W8A8 or W4A8, ort-cpu target, minmax)
with one combination of converter's techniques and evaluates the QDQ model in ONNX Runtime CPU
(ORT_ENABLE_ALL: the fused integer kernels). Each row runs in its own process (``--one-row``), which reports its
wall time and peak resident memory (loading the images included); the ORT-optimized graph's QLinearConv / float
Conv counts and the batch-1 latency (median of rounds over all row models, interleaved) are added afterwards.

AIMET rows (``--aimet``, default on when ``/tmp/aimet/bin/python`` exists): aimet-onnx's ``equalize_model`` on
the same ONNX model, then ``QuantizationSimModel`` with the default config (per-tensor int8 weights, 8-bit
activations, min-max) on the same calibration and evaluation images, in that venv
(tools/aimet_cle_row.py); again with the Clip bounds as Constant nodes, where aimet-onnx looks for a ReLU6 to
replace by Relu (with initializers there it skips every ReLU6 pair); and the same sim without CLE.

    python tools/ptq_techniques.py --assets ../shared/assets [--rows fp32,per-tensor,...] [--aimet PYTHON|none]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import ArrayReader, accuracy, efficientnet_task, latency  # noqa: E402

import converter  # noqa: E402
from converter import QuantConfig  # noqa: E402
from converter.ort_session import optimized_op_counts  # noqa: E402

ROWS = {
    "per-tensor": dict(per_channel=False),
    "per-tensor+cle": dict(per_channel=False, cle=True, cle_relu6="min"),
    "per-tensor+cle(replace-relu6)": dict(per_channel=False, cle=True, cle_relu6="replace"),
    "per-tensor+cle(keep-relu6)": dict(per_channel=False, cle=True, cle_relu6="keep"),
    "per-tensor+bc": dict(per_channel=False, bias_correction=True),
    "per-tensor+cle+bc": dict(per_channel=False, cle=True, cle_relu6="min", bias_correction=True),
    "per-tensor+cle(replace-relu6)+bc": dict(per_channel=False, cle=True, cle_relu6="replace", bias_correction=True),
    "per-tensor+cle(keep-relu6)+bc": dict(per_channel=False, cle=True, cle_relu6="keep", bias_correction=True),
    "per-tensor+cle+bc(auto)": dict(per_channel=False, cle=True, cle_relu6="min", bias_correction=True,
                                    bias_correction_mode="auto"),
    "per-channel": dict(per_channel=True),
    "per-channel+bc": dict(per_channel=True, bias_correction=True),
    "w4-per-channel": dict(weight_bits=4),
    "w4-per-channel+bc": dict(weight_bits=4, bias_correction=True),
}
DEFAULT_ROWS = ("fp32", "per-tensor", "per-tensor+cle(keep-relu6)+bc", "per-tensor+cle", "per-tensor+cle+bc",
                "per-tensor+cle(replace-relu6)", "per-tensor+cle(replace-relu6)+bc", "per-channel")
AIMET_PYTHON = "/tmp/aimet/bin/python"


def peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def one_row(key: str, assets: Path, out_dir: Path) -> dict:
    """Quantize and evaluate one row in this process; the model stays in ``out_dir``."""
    t0 = time.perf_counter()
    task = efficientnet_task(assets)
    if key == "fp32":
        path, report, seconds = task.model, {}, 0.0
    else:
        config = QuantConfig(target="ort-cpu", calib_method="minmax", **ROWS[key])
        t = time.perf_counter()
        result = converter.quantize(task.model, ArrayReader(task.input_name, task.calib), config,
                                    output_dir=out_dir, name=task.key)
        path, report, seconds = result.model_path, result.report, time.perf_counter() - t
    acc = accuracy(Path(path), task)
    counts = optimized_op_counts(str(path))
    row = {"tool": "converter", "row": key, **acc, "of": len(task.eval_y), "quantize_s": round(seconds, 1),
           "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak_rss_mb(),
           "qlinearconv": counts.get("QLinearConv", 0),
           "float_conv": counts.get("Conv", 0) + counts.get("FusedConv", 0),
           "model": str(path)}
    if "cle" in report:
        row["cle_pairs"] = len(report["cle"]["pairs"])
        row["relu6_replaced"] = len(report["cle"]["relu6_replaced"])
    if "bias_correction" in report:
        kinds = [c.get("kind", "empirical") for c in report["bias_correction"]["layers"]]
        row["bias_corrected"] = {k: kinds.count(k) for k in sorted(set(kinds))}
    return row


def aimet_rows(python: str, assets: Path, work: Path) -> list[dict]:
    """AIMET's per-tensor sim with and without ``equalize_model``, in the aimet-onnx venv."""
    task = efficientnet_task(assets)
    model = task.model
    files = {k: work / f"{k}.npy" for k in ("calib", "eval", "labels")}
    np.save(files["calib"], task.calib)
    np.save(files["eval"], task.eval_x)
    np.save(files["labels"], task.eval_y)
    del task
    rows = []
    for extra in ([], ["--clip-bounds-as-nodes"], ["--no-cle"]):
        out = work / f"aimet{''.join(extra)}.json"
        t = time.perf_counter()
        proc = subprocess.run([python, str(Path(__file__).with_name("aimet_cle_row.py")),
                               str(model),
                               *(str(files[k]) for k in ("calib", "eval", "labels")), str(out), *extra],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"tool": "aimet-onnx", "row": "per-tensor " + " ".join(extra),
                         "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]})
            continue
        row = json.loads(out.read_text())
        row["process_wall_s"] = round(time.perf_counter() - t, 1)  # interpreter start and imports included
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default=os.environ.get("CONVERTER_ASSETS", "../shared/assets"),
                    help="folder with efficientnet-lite0/ and imagenet-samples/ (default: $CONVERTER_ASSETS or "
                         "../shared/assets)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated rows (default: {','.join(DEFAULT_ROWS)}; all: fp32,{','.join(ROWS)})")
    ap.add_argument("--aimet", default=AIMET_PYTHON if Path(AIMET_PYTHON).exists() else "none",
                    help="python of a venv with aimet-onnx, or none (default: /tmp/aimet/bin/python when present)")
    ap.add_argument("--latency-runs", type=int, default=30, help="batch-1 latency rounds (0: none; default 30)")
    ap.add_argument("--json", help="also write the rows to this JSON file (default: none)")
    ap.add_argument("--one-row", help=argparse.SUPPRESS)  # internal: run one row in this process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    assets = Path(args.assets)
    if args.one_row:
        print(json.dumps(one_row(args.one_row, assets, Path(args.out))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for key in args.rows.split(","):
            proc = subprocess.run([sys.executable, __file__, "--assets", str(assets), "--one-row", key,
                                   "--out", str(Path(d) / key)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                rows.append({"tool": "converter", "row": key, "error": f"exit {proc.returncode}"})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "model"}), flush=True)
        done = {r["row"]: Path(r["model"]) for r in rows if "model" in r}
        if args.latency_runs and done:
            task = efficientnet_task(assets)
            lat = latency(done, {task.input_name: task.eval_x[:1]}, 1, 5, args.latency_runs)
            for r in rows:
                if r["row"] in lat:
                    r["latency_ms_batch1_1thread"] = round(lat[r["row"]]["median_ms"], 2)
            print(json.dumps({k: round(v["median_ms"], 2) for k, v in lat.items()}), flush=True)
        if args.aimet != "none":
            for row in aimet_rows(args.aimet, assets, Path(d)):
                rows.append(row)
                print(json.dumps(row), flush=True)
        else:
            print("aimet-onnx: no venv given (--aimet PYTHON): no AIMET rows")
    print(f"{'tool':<11} {'row':<34} {'top1':>5} {'of':>4} {'QLinConv':>8} {'fltConv':>7} {'lat ms':>7} "
          f"{'wall s':>7} {'peak MB':>7}")
    for r in rows:
        print(f"{r['tool']:<11} {r['row']:<34} {r.get('top1', '-'):>5} {r.get('of', '-'):>4} "
              f"{r.get('qlinearconv', '-'):>8} {r.get('float_conv', '-'):>7} "
              f"{r.get('latency_ms_batch1_1thread', '-'):>7} "
              f"{r.get('wall_s', '-'):>7} {r.get('peak_rss_mb', '-'):>7}")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "model"} for r in rows],
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
