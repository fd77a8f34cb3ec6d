"""The EfficientNet-Lite0 W4A8 block reconstruction once on the CPU and once on CUDA: wall-time ratio and top-1 of
both (900 held-out ImageNet samples, 100 calibrate). A prepared script for a machine with a GPU (issue 26 pt 4):
the torch-side work (``--device``) moves to CUDA, ONNX Runtime stays on its CPU provider (no onnxruntime-gpu there).

    python -m tools.gpu_reconstruction --assets DIR [--iterations N] [--threads 2] [--devices cpu,cuda]

Each device runs in this process one after the other, the same config otherwise (the setting of the
``w4-mse-fl8-asym+brecq+bc`` row of tools/ptq_techniques.py); prints one JSON line per device, then the ratio. Where
torch sees no GPU the cuda run falls back to the CPU (one log line) and says so (``device_used``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from converter import QuantConfig
from tools.benchlib.assets import assets_root, efficientnet_task
from tools.benchlib.measure import quantize_any_speed

SETTING = dict(target="ort-cpu", calib_method="minmax", weight_bits=4, weight_calib="mse",
               weight_bits_overrides={"first": 8, "last": 8}, weight_symmetric=False, block_reconstruction=True,
               bias_correction=True)


def run_one(task, device: str, iterations: int, threads: int, out: Path) -> dict:
    import torch

    config = QuantConfig(**SETTING, device=device, reconstruction_iterations=iterations, threads=threads)
    t = time.perf_counter()
    result = quantize_any_speed(task.model, task.calib, config, output_dir=out, name=f"effnet_{device}")
    seconds = time.perf_counter() - t
    entry = result.report.get("block_reconstruction", {})
    used = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    return {"device": device, "device_used": used, "top1": round(task.metrics(str(result.model_path))["top1"] * 900),
            "of": 900, "quantize_s": round(seconds, 1), "reconstruction_s": entry.get("seconds"),
            "units": len(entry.get("units", [])), "iterations": iterations}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", help="the assets folder (or $CONVERTER_ASSETS)")
    ap.add_argument("--iterations", type=int, default=QuantConfig().reconstruction_iterations,
                    help="Adam steps per block (default: the config's)")
    ap.add_argument("--threads", type=int, default=2, help="ORT and torch CPU threads (default: 2)")
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated, in run order (default: cpu,cuda)")
    args = ap.parse_args()
    task = efficientnet_task(assets_root(args.assets))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for device in args.devices.split(","):
            rows.append(run_one(task, device, args.iterations, args.threads, Path(d) / device))
            print(json.dumps(rows[-1]), flush=True)
    by = {r["device"]: r for r in rows}
    if "cpu" in by and "cuda" in by:
        print(json.dumps({"cuda_over_cpu_wall": round(by["cuda"]["quantize_s"] / by["cpu"]["quantize_s"], 3),
                          "reconstruction_cuda_over_cpu": round(by["cuda"]["reconstruction_s"]
                                                                / max(by["cpu"]["reconstruction_s"], 1e-9), 3),
                          "top1_cpu": by["cpu"]["top1"], "top1_cuda": by["cuda"]["top1"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
