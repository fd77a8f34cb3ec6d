"""What the default bias correction buys and costs: top-1 and the technique's own seconds (the report's
``timings.bias_correction_s``) for EfficientNet-Lite0 (100 calibration / 900 held-out ImageNet samples), ResNet-8
(200 / 2,000 CIFAR-10 images) and the digits CNN (models/digits_cnn.py, 64 / 597), with bias correction off, the
default's ``fast_bias_correction`` and ``--bias-correction`` (empirical: 64 samples, two rounds); every other setting the default.

    python -m tools.bias_correction_cost --assets /work/shared/assets [--models efficientnet,resnet8,digits]
        [--rows off,fast,empirical,fast:32]   (fast:N: mode fast on N samples; fast:all: on every layer, not only depthwise Convs)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from converter import QuantConfig

from .bench_e2e import Task, accuracy, calib_reader, efficientnet_task, resnet8_task
from .benchlib.assets import add_assets_argument, assets_or_exit
from .benchlib.tasks import load_models_module
from .benchlib.measure import quantize_any_speed


ROWS = {"off": dict(bias_correction=False, fast_bias_correction=False), "fast": dict(fast_bias_correction=True),
        "empirical": dict(bias_correction=True, bias_correction_mode="empirical")}


def digits_task():
    digits = load_models_module("digits_cnn")
    x_tr, _, x_te, y_te = digits.load_split()
    d = Path(tempfile.mkdtemp())
    import torch

    torch.onnx.export(digits.build(), torch.from_numpy(x_tr[:1]), str(d / "digits.onnx"), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, opset_version=17,
                      dynamo=False)
    return Task("digits", "digits CNN (calib 64, eval 597)", d / "digits.onnx", "x", x_tr[:64], x_te,
                y_te.astype(np.int64), (1,), 128, "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_assets_argument(p)
    p.add_argument("--models", default="efficientnet,resnet8,digits")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.assets = assets_or_exit(args.assets)
    makers = {"efficientnet": lambda: efficientnet_task(args.assets), "resnet8": lambda: resnet8_task(args.assets),
              "digits": digits_task}
    out = {}
    for m in args.models.split(","):
        task = makers[m]()
        for row in args.rows.split(","):
            name, _, variant = row.partition(":")  # fast:32 = mode fast on 32 samples, fast:all = on every layer
            import converter.techniques.fast_bias_correction as fast

            fast.SAMPLES = int(variant) if variant.isdigit() else 16
            fast.LAYERS = "all" if variant == "all" else "depthwise"
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                r = quantize_any_speed(str(task.model), calib_reader(task),
                                       QuantConfig(**ROWS[name]), d, name="m")
                total = time.perf_counter() - t
                acc = accuracy(r.model_path, task)
            bc = r.report.get("bias_correction") or r.report.get("fast_bias_correction") or {}
            out[f"{m}/{row}"] = {"top1": int(acc["top1"]), "of": len(task.eval_y), "layers": len(bc.get("layers", [])),
                                 "bias_correction_s": r.report["timings"].get("bias_correction_s",
                                                                              r.report["timings"].get("fast_bias_correction_s")),
                                 "total_s": round(total, 1)}
            print(f"{m}/{row}: {out[f'{m}/{row}']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
