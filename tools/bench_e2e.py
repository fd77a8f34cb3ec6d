"""End-to-end benchmark: ``converter.quantize`` against ONNX Runtime's ``quantize_static``, one run.

Both tools quantize the same float model from the same calibration images, in the same process,
and every figure below is measured for both in this run (nothing is quoted from elsewhere):

=================  ============================================================================
accuracy           MLPerf Tiny ResNet-8 / CIFAR-10: calibrate on test images 0..199, top-1 on
                   200..2199, in class-interleaved order (the file is sorted by class).
                   EfficientNet-Lite0 / ImageNet samples: calibrate on images 0..99,
                   top-1/top-5 on the other 900. Evaluated with ORT_ENABLE_ALL, i.e. the fused
                   integer kernels ORT really runs, not a fake-quant simulation.
latency            ORT CPU, batch 1, same intra-op thread count for every model, warm-up, then
                   ``--runs`` rounds in which each model runs once (order rotated each round, so
                   background load hits all models alike); median ms and ours/ORT ratio.
fusion             each QDQ model loaded with ``optimized_model_filepath`` (ORT_ENABLE_EXTENDED,
                   where the QDQ -> QLinear* fusions run; ALL only adds layout changes); op counts
                   of the saved graph: Conv->QLinearConv, Gemm->QGemm, Add->QLinearAdd, leftover
                   float Conv/Gemm/Add and QuantizeLinear/DequantizeLinear.
conversion time    wall time of calibration + conversion + writing the model, ours vs ORT.
=================  ============================================================================

Peer settings (the ones the MLPerf/EfficientNet baselines in BASELINE.md use)::

    quantize_static(quant_format=QDQ, per_channel=True, calibrate_method=MinMax,
                    activation_type=QUInt8, weight_type=QInt8)

Ours: ``QuantConfig(target="ort-cpu", calib_method="minmax", per_channel=True)``. Both read the
same calibration reader class (``tools.benchlib.ListReader``, batches of 16); the peer runs through
``tools.benchlib.ort_quantize_static`` (a private copy of the model, opset-13 upgrade of older models).

Usage::

    python -m tools.bench_e2e [--assets DIR] [--runs N] [--threads T] [--json FILE]

``--assets`` defaults to ``$CONVERTER_ASSETS``, then /work/shared/assets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import converter
from converter import QuantConfig

from .benchlib.assets import (
    add_assets_argument,
    assets_or_exit,
    cifar10_test,
    effnet_input,
    imagenet_samples,
    resnet8_input,
)
from .benchlib.measure import latency_stats
from .benchlib.measure import session as bench_session
from .benchlib.ort_baseline import ListReader, ort_quantize_static
from .benchlib.tasks import batches
from .benchlib.measure import quantize_any_speed


CALIB_BATCH = 16
FP32, ORT_QDQ, OURS = "fp32", "ort", "ours"
LABELS = {FP32: "FP32", ORT_QDQ: "ORT quantize_static", OURS: "ours (converter)"}


# --- tasks ---------------------------------------------------------------------------------------

@dataclass
class Task:
    """One model with its calibration and evaluation data (float32 NCHW, already preprocessed)."""

    key: str
    title: str
    model: Path
    input_name: str
    calib: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    topk: tuple[int, ...]
    eval_batch: int
    requirement: str


def resnet8_task(assets: Path) -> Task:
    """MLPerf Tiny ResNet-8: raw 0..255 float32 pixels, NCHW (see cifar10-resnet8/check.py)."""
    folder = assets / "cifar10-resnet8"
    images, labels = cifar10_test(assets, 2200)  # class-interleaved: the file is sorted by class
    x = resnet8_input(images)
    return Task("resnet8", "MLPerf Tiny ResNet-8 / CIFAR-10 (calib 200, eval 2000)", folder / "resnet8_cifar10.onnx",
                "input_1", x[:200], x[200:2200], labels[200:2200].astype(np.int64), (1,), 250,
                "ours within 1 point of FP32 top-1")


def efficientnet_task(assets: Path) -> Task:
    """EfficientNet-Lite0: x = (pixel - 127) / 128, NCHW (see efficientnet-lite0/README.txt)."""
    images, labels = imagenet_samples(assets)
    x = effnet_input(images)
    return Task("efficientnet_lite0", "EfficientNet-Lite0 / ImageNet samples (calib 100, eval 900)",
                assets / "efficientnet-lite0" / "efficientnet-lite0_opset13.onnx", "input", x[:100], x[100:],
                labels[100:].astype(np.int64), (1, 5), 50, "ours top-1 >= ORT top-1")


# --- quantization --------------------------------------------------------------------------------

def calib_reader(task: Task) -> ListReader:
    """The calibration images in batches of 16, as a fresh reader (both tools read this class)."""
    return ListReader(batches(task.calib, CALIB_BATCH, task.input_name))


def quantize_ours(task: Task, workdir: Path) -> tuple[Path, float]:
    config = QuantConfig(target="ort-cpu", calib_method="minmax", per_channel=True)
    t = time.perf_counter()
    result = quantize_any_speed(task.model, calib_reader(task), config,
                                output_dir=workdir / "ours", name=task.key)
    return Path(result.model_path), time.perf_counter() - t


def quantize_ort(task: Task, workdir: Path) -> tuple[Path, float]:
    folder = workdir / "ort"
    folder.mkdir(exist_ok=True)
    out = folder / f"{task.key}_qdq.onnx"
    seconds = ort_quantize_static(task.model, batches(task.calib, CALIB_BATCH, task.input_name), out)
    return out, seconds


def quantize_both(task: Task, workdir: Path, reps: int) -> tuple[dict[str, Path], dict[str, float]]:
    """Quantize with both tools ``reps`` times, alternating which goes first; best wall time of each."""
    paths: dict[str, Path] = {}
    times: dict[str, list[float]] = {OURS: [], ORT_QDQ: []}
    tools = {OURS: quantize_ours, ORT_QDQ: quantize_ort}
    for r in range(reps):
        for key in ([OURS, ORT_QDQ] if r % 2 == 0 else [ORT_QDQ, OURS]):
            paths[key], seconds = tools[key](task, workdir)
            times[key].append(seconds)
    return paths, {k: min(v) for k, v in times.items()}


# --- measurements --------------------------------------------------------------------------------

def session(path: Path, threads: int = 0, level: str = "all", save_to: Path | None = None) -> ort.InferenceSession:
    return bench_session(path, level, threads, save_optimized=save_to)


def accuracy(path: Path, task: Task) -> dict[str, int]:
    s = session(path)
    logits = np.concatenate([s.run(None, {task.input_name: task.eval_x[i:i + task.eval_batch]})[0]
                             for i in range(0, len(task.eval_x), task.eval_batch)])
    # stable: of tied scores the lower class first, as argmax (converter's metrics, verify) picks; a quantized
    # output ties often (EfficientNet-Lite0 W4A8's 8-bit logits: 16 of 900 images tie their top two classes, and
    # an unstable sort scored the same model 773 where argmax scores 768)
    ranked = np.argsort(-logits, axis=1, kind="stable")
    return {f"top{k}": int((ranked[:, :k] == task.eval_y[:, None]).any(axis=1).sum()) for k in task.topk}


def latency(paths: dict[str, Path], feed: dict[str, np.ndarray], threads: int, warmup: int,
            runs: int) -> dict[str, dict[str, float]]:
    """Batch-1 latency (``tools.benchlib`` timer: every round runs each model once, the order rotated)."""
    return latency_stats(paths, feed, runs, warmup, threads)


FUSIONS = (("Conv", "QLinearConv"), ("Gemm", "QGemm"), ("Add", "QLinearAdd"))


def fusion(path: Path, float_ops: Counter, save_to: Path) -> dict:
    """Op counts of the graph ORT actually runs (saved after ORT_ENABLE_EXTENDED optimization)."""
    session(path, level="extended", save_to=save_to)
    ops = Counter(n.op_type for n in onnx.load(str(save_to)).graph.node)
    out = {f"{src}->{dst}": f"{ops[dst]}/{float_ops[src]}" for src, dst in FUSIONS}
    out.update({f"float {src}": ops[src] for src, _ in FUSIONS})
    out.update({"QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"],
                "ops": dict(sorted(ops.items()))})
    return out


# --- one task ------------------------------------------------------------------------------------

def run_task(task: Task, workdir: Path, args: argparse.Namespace) -> dict:
    log(f"== {task.title}")
    float_ops = Counter(n.op_type for n in onnx.load(str(task.model)).graph.node)
    paths, quant_s = quantize_both(task, workdir, args.quant_reps)
    paths = {FP32: task.model, ORT_QDQ: paths[ORT_QDQ], OURS: paths[OURS]}
    acc = {k: accuracy(p, task) for k, p in paths.items()}
    for k in paths:
        log(f"  {LABELS[k]:<22} " + "  ".join(f"{m} {v}/{len(task.eval_y)}" for m, v in acc[k].items()))
    lat = latency(paths, {task.input_name: task.eval_x[:1]}, args.threads, args.warmup, args.runs)
    fus = {k: fusion(paths[k], float_ops, workdir / f"{task.key}_{k}_optimized.onnx") for k in (ORT_QDQ, OURS)}
    result = {
        "title": task.title, "requirement": task.requirement, "eval_images": len(task.eval_y),
        "calib_images": len(task.calib), "accuracy": acc, "latency": lat,
        "latency_ratio_ours_over_ort": lat[OURS]["median_ms"] / lat[ORT_QDQ]["median_ms"],
        "quantize_seconds": quant_s, "quantize_ratio_ours_over_ort": quant_s[OURS] / quant_s[ORT_QDQ],
        "fusion": fus, "float_ops": dict(sorted(float_ops.items())),
        "model_opset": opset_of(task.model),
    }
    result["checks"] = checks(task, result)
    return result


def opset_of(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


def checks(task: Task, r: dict) -> dict[str, bool]:
    acc, n = r["accuracy"], r["eval_images"]
    out = {}
    if task.key == "resnet8":
        out["ours within 1 point of FP32"] = (acc[FP32]["top1"] - acc[OURS]["top1"]) * 100 / n <= 1.0
    else:
        out["ours top-1 >= ORT top-1"] = acc[OURS]["top1"] >= acc[ORT_QDQ]["top1"]
    out["latency within 10% of ORT QDQ"] = r["latency_ratio_ours_over_ort"] <= 1.10
    return out


# --- report --------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(msg, flush=True)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(results: dict[str, dict], args: argparse.Namespace) -> str:
    out = []
    for key, r in results.items():
        n = r["eval_images"]
        metrics = list(r["accuracy"][FP32])
        rows = [["model", *[f"{m} /{n}" for m in metrics], "%top1", "latency ms", "quantize s"]]
        for k in (FP32, ORT_QDQ, OURS):
            top1 = r["accuracy"][k]["top1"]
            rows.append([LABELS[k], *[str(r["accuracy"][k][m]) for m in metrics], f"{100 * top1 / n:.2f}",
                         f"{r['latency'][k]['median_ms']:.2f}",
                         f"{r['quantize_seconds'][k]:.2f}" if k in r["quantize_seconds"] else "-"])
        rows.append(["ours / ORT", *[f"{r['accuracy'][OURS][m] - r['accuracy'][ORT_QDQ][m]:+d}" for m in metrics],
                     "", f"{r['latency_ratio_ours_over_ort']:.3f}x", f"{r['quantize_ratio_ours_over_ort']:.2f}x"])
        out.append(f"{r['title']}\n{table(rows)}")
        cols = [c for c in r["fusion"][OURS] if c != "ops"]
        frows = [["fused graph (ORT EXTENDED)", *cols]]
        frows += [[LABELS[k], *[str(r["fusion"][k][c]) for c in cols]] for k in (ORT_QDQ, OURS)]
        out.append(table(frows))
        if r["model_opset"] < 13:
            out.append(f"note: the float model is opset {r['model_opset']}; quantize_static got its opset-13 "
                       "conversion (per-channel output of the original is an invalid model)")
        out.append("checks: " + "; ".join(f"{c}: {'PASS' if ok else 'FAIL'}" for c, ok in r["checks"].items()))
    out.append(f"latency: batch 1, intra-op threads {args.threads}, {args.warmup} warm-up + {args.runs} interleaved "
               f"runs, median; quantize s: best of {args.quant_reps} (calibration + conversion + write)")
    return "\n\n".join(out)


def environment(args: argparse.Namespace) -> dict:
    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "converter": converter.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
            "quant_reps": args.quant_reps, "assets": str(args.assets)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_assets_argument(p)
    p.add_argument("--runs", type=int, default=300, help="timed rounds per model for latency (default 300)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up runs per model (default 10)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the latency runs (default 1)")
    p.add_argument("--quant-reps", type=int, default=3,
                   help="quantize with each tool this many times, alternating order; best time kept (default 3)")
    p.add_argument("--models", nargs="+", choices=("resnet8", "efficientnet_lite0"),
                   default=["resnet8", "efficientnet_lite0"])
    p.add_argument("--json", type=Path, help="write every figure to this JSON file")
    p.add_argument("--keep", type=Path, help="write the QDQ and ORT-optimized models here instead of a temp dir")
    args = p.parse_args(argv)
    args.assets = assets_or_exit(args.assets)
    for name in ("cifar10-resnet8", "efficientnet-lite0", "imagenet-samples"):
        if not (args.assets / name).is_dir():
            p.error(f"{args.assets / name} not found: pass --assets DIR or set CONVERTER_ASSETS")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # root: hides quantize_static's "please pre-process" warning
    logging.getLogger("converter").setLevel(logging.WARNING)
    loaders = {"resnet8": resnet8_task, "efficientnet_lite0": efficientnet_task}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_e2e.") as tmp:
        workdir = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep
        for key in args.models:
            results[key] = run_task(loaders[key](args.assets), workdir, args)
    text = summary(results, args)
    log("\n" + text)
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(args), "results": results}, indent=2) + "\n")
        log(f"\nwrote {args.json}")
    return 0 if all(ok for r in results.values() for ok in r["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
