"""Per-tensor calibration choice (``calib_method: auto``) beside one method for every tensor, all-INT8, one run.

Rows per model (same calibration and evaluation data, the default QuantConfig otherwise: SmoothQuant on):

* FP32;
* ours with ``calib_method`` minmax, percentile (99.999), entropy, mse for every tensor;
* ours with ``calib_method: auto`` (each activation's range chosen from ``calib_auto_candidates`` by the error at
  the layer reading it, converter/techniques/calib_choice.py), and what it chose (method: tensors);
* ONNX Runtime ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax, all ops).

Columns: the model's metrics on held-out data (tools/benchlib: MiniLM last_hidden_state cosine on attended tokens
and STS-B Spearman; EfficientNet-Lite0 / ResNet-8 top-1 and agreement), the compute layers ONNX Runtime runs in
INT8 / all (a profiled batch-1 run), quantize wall time, batch-1 latency (median of ``--runs``, ``--threads``
threads, models taking turns) and its ratio to FP32.

Usage (from the repository root)::

    python -m tools.calib_auto_bench --assets DIR [--models minilm,efficientnet_lite0,resnet8]
        [--minilm-onnx FILE] [--rows minmax,percentile,entropy,mse,auto,ort] [--runs 30] [--threads 1] [--json F]
        [--smoothquant-alpha A]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from converter import QuantConfig

from .benchlib import assets as bench_assets
from .benchlib.measure import compare_latency, compute_int8_share
from .benchlib.ort_baseline import ort_quantize_static
from .benchlib.measure import quantize_any_speed

METHODS = ("minmax", "percentile", "entropy", "mse", "auto")


def minilm_task(root: Path, work: Path, minilm_onnx: str | None):
    """MiniLM as tools/smoothquant_bench.py and search_bench.py measure it: calibration the first 200 distinct STS-B
    test sentences, evaluation the next 200, both padded to 128 tokens; last_hidden_state cosine to FP32 over all
    positions (``cosine``, the issue's figure) and over the attended tokens (``cosine_attended``); STS-B Spearman on
    the 1379 pairs (tools/benchlib)."""
    import numpy as np

    from .benchlib.tasks import run_batches

    task = bench_assets.minilm_task(root, work, minilm_onnx)
    with open(root / "minilm-sts" / "sts-test.csv", encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    sentences = list(dict.fromkeys(s for r in rows for s in (r[5], r[6])))
    tok = bench_assets.tokenizer(root, fixed=True)
    task.calib = [bench_assets.feeds(tok, sentences[i:i + 8]) for i in range(0, 200, 8)]
    held = [bench_assets.feeds(tok, sentences[i:i + 25]) for i in range(200, 400, 25)]
    mask = np.concatenate([b["attention_mask"] for b in held]).astype(bool)
    ref = np.concatenate([run_batches(task.model, [b], "last_hidden_state") for b in held]).astype(np.float64)
    spearman = task.metrics

    def cos(a, b) -> float:
        a, b = a.ravel(), b.ravel()
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    def metrics(path: str) -> dict[str, float]:
        got = np.concatenate([run_batches(path, [b], "last_hidden_state") for b in held]).astype(np.float64)
        return {"cosine": cos(got, ref), "cosine_attended": cos(got[mask], ref[mask]),
                "spearman": spearman(path)["spearman"]}

    task.metrics = metrics
    task.title = "all-MiniLM-L6-v2 (calib 200 / eval 200 STS-B sentences, seq 128; STS-B 1379 pairs)"
    return task


def _task(key: str, root: Path, work: Path, minilm_onnx: str | None):
    if key == "minilm":
        return minilm_task(root, work, minilm_onnx)
    if key == "efficientnet_lite0":
        return bench_assets.efficientnet_task(root)
    if key == "resnet8":
        return bench_assets.resnet8_task(root)
    raise SystemExit(f"error: unknown model {key!r}\nfix: use minilm, efficientnet_lite0, resnet8")


def run_model(key: str, root: Path, work: Path, args) -> dict[str, Any]:
    task = _task(key, root, work, args.minilm_onnx)
    out = work / key
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {"fp32": {"metrics": task.metrics(str(task.model))}}
    paths = {"fp32": task.model}
    rows["fp32"]["int8"] = compute_int8_share(task.model, task.feed)
    for row in args.rows.split(","):
        if row == "ort":
            try:
                seconds = ort_quantize_static(task.model, task.calib, out / "ort.qdq.onnx")
                paths["ort"] = out / "ort.qdq.onnx"
                rows["ort"] = {"seconds": round(seconds, 1)}
            except Exception as exc:  # noqa: BLE001 - a failing peer is a result
                rows["ort"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        if row not in METHODS:
            raise SystemExit(f"error: unknown row {row!r}\nfix: use {', '.join(METHODS)}, ort")
        t = time.perf_counter()
        extra = {} if args.smoothquant_alpha is None else {
            "smoothquant_alpha": args.smoothquant_alpha if args.smoothquant_alpha == "auto"
            else float(args.smoothquant_alpha)}
        res = quantize_any_speed(str(task.model), task.calib, QuantConfig(calib_method=row, **(task.config | extra)),
                                 out, row)
        rows[row] = {"seconds": round(time.perf_counter() - t, 1)}
        paths[row] = res.model_path
        choice = res.report.get("calib_choice")
        if choice:
            rows[row]["chosen"] = choice["chosen"]
            rows[row]["choice_s"] = res.report["timings"].get("calib_choice_s")
            prop = choice.get("propagated")
            if prop:
                rows[row]["propagated"] = {k: prop[k] for k in ("start", "evaluations", "model_error", "starts")} | {
                    "moved": len(prop["moved"])}
    for k, p in paths.items():
        if k == "fp32":
            continue
        rows[k]["metrics"] = task.metrics(str(p))
        rows[k]["int8"] = compute_int8_share(p, task.feed)
    lat = compare_latency(paths, task.feed, args.runs, threads=args.threads)
    for k, ms in lat.items():
        rows[k]["latency_ms"] = round(ms, 3)
        rows[k]["latency_x_fp32"] = round(ms / lat["fp32"], 3)
    return {"title": task.title, "rows": rows}


def print_table(key: str, r: dict[str, Any]) -> None:
    print(f"\n{r['title']}")
    for k, row in r["rows"].items():
        if "error" in row:
            print(f"  {k:11s} error: {row['error']}")
            continue
        m = ", ".join(f"{n} {v:.4f}" for n, v in row["metrics"].items())
        i8 = row["int8"]
        extra = f"  chosen {row['chosen']}" if row.get("chosen") else ""
        print(f"  {k:11s} {m}; INT8 {i8['int8']}/{i8['int8'] + i8['float']}; {row.get('seconds', '-')} s; "
              f"{row['latency_ms']:.2f} ms ({row['latency_x_fp32']:.2f}x){extra}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", help=f"assets folder (default: ${bench_assets.ASSETS_ENV})")
    ap.add_argument("--models", default="minilm,efficientnet_lite0,resnet8")
    ap.add_argument("--minilm-onnx")
    ap.add_argument("--rows", default="minmax,percentile,entropy,mse,auto,ort")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--smoothquant-alpha", help="SmoothQuant alpha for every row (a number or auto; default: the "
                                                "config's)")
    ap.add_argument("--keep", help="write the models into this folder (default: a temporary one, removed)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    root = bench_assets.assets_root(args.assets)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="calib_auto_"))
    results = {}
    try:
        for key in args.models.split(","):
            results[key] = run_model(key, root, work, args)
            print_table(key, results[key])
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
