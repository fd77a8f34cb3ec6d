"""One benchmark row group per model: FP32, ours default (all-INT8), ours search to the model's target, and ONNX
Runtime's ``quantize_static``, all measured in one run of this script.

For each model (``--models``, default all): the FP32 model's metric; ``converter.quantize`` with the default
``QuantConfig`` (all-INT8 on ort-cpu); ``converter.search.auto_quantize`` to the model's target with the same
config (default ranking, strategy and fallback); ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8
weights, uint8 activations, MinMax) on the same calibration batches. Every row gets

* the model's metrics on its held-out data (see tools/benchlib/assets.py and tasks.py for each model's data);
* the compute INT8 share as ONNX Runtime runs it: the layer kernels one profiled batch-1 run executes (inside
  If/Loop bodies too, only the branch taken) that run on integers (QLinearConv, QLinearMatMul, MatMulInteger,
  QGemm, ...) over those plus the layer ops that run in float (Conv, FusedConv, Gemm, MatMul, LSTM, ...), and the
  float ones by name in the JSON;
* batch-1 latency: median of ``--runs`` runs after a warm-up, ``--threads`` intra-op threads, the four models
  taking turns run by run (a load spike on a shared machine hits them alike), as a ratio to FP32 and to all-INT8;
* for the search: layers it kept in float (its report), met or not, the evaluations it made (its report's
  ``full_evaluations`` and the calls this script counted on its evaluator, ranking runs of the user's metric
  included), and its error message when it ended without success (TargetNotMetError: the model and report it
  wrote are still measured).

Targets: EfficientNet-Lite0 top-1 drop <= 0.5 point; ResNet-8 top-1 agreement >= 0.99; MiniLM last_hidden_state
cosine drop <= 0.01; Silero VAD min(cosine, frame agreement) >= 0.99; digits YOLO class-score agreement drop <=
0.01; digits CNN top-1 agreement >= 0.99.

Usage (from the repository root)::

    python -m tools.any_model_bench --assets DIR [--models digits_cnn,digits_yolo,resnet8,silero_vad,minilm,
        efficientnet_lite0] [--json out.json] [--out DIR] [--runs 50] [--threads 1] [--minilm-onnx FILE]

The asset models need ``--assets DIR`` or ``$CONVERTER_ASSETS``; digits_cnn and digits_yolo (models/) do not.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

import converter
from converter import QuantConfig
from converter.errors import UserError
from converter.search import AccuracyTarget, auto_quantize

from .benchlib import assets as bench_assets
from .benchlib.measure import compare_latency, compute_int8_share
from .benchlib.ort_baseline import ort_quantize_static
from .benchlib.tasks import BUNDLED, Task
from .benchlib.measure import quantize_any_speed

ASSET_MODELS = ("resnet8", "silero_vad", "minilm", "efficientnet_lite0")
MODELS = ("digits_cnn", "digits_yolo") + ASSET_MODELS
FP32, DEFAULT, SEARCH, ORT = "fp32", "ours_default", "ours_search", "ort_quantize_static"
LABELS = {FP32: "FP32", DEFAULT: "ours default (all-INT8)", SEARCH: "ours search", ORT: "ORT quantize_static"}


class CountingEvaluator:
    """The task's evaluator, counting its calls (every model run of the user's metric the search makes); other
    attributes pass through to the wrapped evaluator."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, model_path) -> float:
        self.calls += 1
        return self.fn(model_path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fn, name)


def load_task(key: str, args, work: Path) -> Task:
    if key in BUNDLED:
        return BUNDLED[key](work)
    root = bench_assets.assets_root(args.assets)
    if key == "efficientnet_lite0":
        return bench_assets.efficientnet_task(root)
    if key == "resnet8":
        return bench_assets.resnet8_task(root)
    if key == "minilm":
        return bench_assets.minilm_task(root, work, args.minilm_onnx)
    return bench_assets.silero_task(root)


def _search_summary(report: dict, counted: int) -> dict[str, Any]:
    s = report.get("search", {})
    fallback = s.get("fallback_layers", [])
    keep = ("met", "baseline_metric", "final_metric", "threshold", "full_evaluations", "fallback", "float_fraction",
            "float_mac_fraction", "latency_ratio", "budget", "stopped_by")  # the last ones where the search has them
    out = {k: s[k] for k in keep if k in s}
    out.update(float_layers=[{"name": k.get("name"), "op_type": k.get("op_type"), "subgraph": k.get("subgraph")}
                             for k in fallback],
               evaluations_listed=len(s.get("evaluations", [])), evaluator_calls=counted,
               layers_ranked=len(s.get("ranking", [])))
    return out


def run_model(task: Task, out: Path, args) -> dict[str, Any]:
    """Every row of one model, from this one run."""
    config = QuantConfig(**task.config)
    rows: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {FP32: task.model}
    t = time.perf_counter()
    rows[FP32] = {"metrics": task.metrics(str(task.model))}
    rows[FP32]["int8"] = compute_int8_share(task.model, task.feed)
    print(f"  FP32 {rows[FP32]['metrics']}", flush=True)

    t = time.perf_counter()
    res = quantize_any_speed(str(task.model), task.calib, config, output_dir=out / "default", name=task.key)
    paths[DEFAULT] = Path(res.model_path)
    rows[DEFAULT] = {"seconds": round(time.perf_counter() - t, 2)}
    print(f"  ours default: quantized in {rows[DEFAULT]['seconds']} s", flush=True)

    evaluator = CountingEvaluator(task.evaluate)
    t = time.perf_counter()
    search_dir = out / "search"
    options, crashed = dict(task.search_options), None
    while True:
        try:
            res = auto_quantize(str(task.model), task.calib, evaluator, task.target, config, output_dir=search_dir,
                                name=task.key, **options)
            report, paths[SEARCH], ended = res.report, Path(res.model_path), None
        except UserError as exc:  # TargetNotMetError & co: the best model and the report are written first
            ended = f"{type(exc).__name__}: {exc}"
            report_file = search_dir / f"{task.key}.report.json"
            report = json.loads(report_file.read_text()) if report_file.exists() else {}
            written = [p for p in (search_dir / f"{task.key}.qdq.onnx", search_dir / f"{task.key}.onnx")
                       if p.exists()]
            if written:
                paths[SEARCH] = written[0]
        except Exception as exc:  # a crash (not a user error) is a result; once more without the search's latency probe
            if crashed is not None or options.get("latency") is False:
                raise
            crashed = f"{type(exc).__name__}: {exc}"
            print(f"  ours search CRASHED ({crashed}); again with latency=False", flush=True)
            options["latency"] = False
            evaluator.calls = 0
            if search_dir.exists():
                shutil.rmtree(search_dir)
            continue
        break
    rows[SEARCH] = {"seconds": round(time.perf_counter() - t, 1), "search": _search_summary(report, evaluator.calls),
                    "ended": ended, "crashed_first": crashed}
    print(f"  ours search: {rows[SEARCH]['seconds']} s, {evaluator.calls} evaluator calls"
          + (f", {ended.splitlines()[0]}" if ended else ""), flush=True)

    try:
        seconds = ort_quantize_static(task.model, task.calib, out / f"{task.key}.ort.qdq.onnx")
        paths[ORT] = out / f"{task.key}.ort.qdq.onnx"
        rows[ORT] = {"seconds": round(seconds, 2)}
    except Exception as exc:  # noqa: BLE001 - the peer's failure is a result too
        rows[ORT] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    print(f"  ORT quantize_static: {rows[ORT]}", flush=True)

    for key in (DEFAULT, SEARCH, ORT):
        if key in paths:
            rows[key]["metrics"] = task.metrics(str(paths[key]))
            rows[key]["int8"] = compute_int8_share(paths[key], task.feed)
    lat = compare_latency({k: p for k, p in paths.items()}, task.feed, args.runs, threads=args.threads)
    for key, ms in lat.items():
        rows[key]["latency_ms"] = round(ms, 4)
        rows[key]["x_fp32"] = round(ms / lat[FP32], 3)
        if DEFAULT in lat:
            rows[key]["x_int8"] = round(ms / lat[DEFAULT], 3)
    return {"title": task.title, "metric": task.metric_name, "target": task.target_text,
            "paths": {k: str(p) for k, p in paths.items()}, "rows": rows}


def print_table(results: dict[str, dict], threads: int, runs: int) -> None:
    nan = float("nan")
    print(f"\nbatch-1 latency: median of {runs} runs, {threads} thread(s), models taking turns; INT8 share: layer "
          "kernels ORT runs on integers / all layer kernels of its optimized graph")
    head = (f"{'model':20s} {'row':24s} {'metric':>9s} {'other':>22s} {'INT8':>9s} {'share':>6s} {'ms':>8s} "
            f"{'xFP32':>6s} {'xINT8':>6s} {'float':>5s} {'evals':>9s} {'met':>4s}")
    print(head)
    print("-" * len(head))
    for key, r in results.items():
        if "error" in r:
            print(f"{key:20s} error: {r['error']}")
            continue
        name = r["metric"]
        for row_key, label in LABELS.items():
            row = r["rows"].get(row_key)
            if row is None or "metrics" not in row:
                err = row.get("error", "no model") if row else "not run"
                print(f"{key:20s} {label:24s} {err}")
                continue
            m = row["metrics"]
            other = " ".join(f"{v:.4f}" for k, v in m.items() if k != name)
            i8 = row["int8"]
            s = row.get("search", {})
            evals = f"{s.get('full_evaluations', '')}/{s.get('evaluator_calls', '')}" if s else ""
            met = ("yes" if s.get("met") else "NO") if s else ""
            n_float = str(len(s.get("float_layers", []))) if s else ""
            print(f"{key:20s} {label:24s} {m[name]:9.4f} {other:>22s} {i8['int8']:>4d}/{i8['int8'] + i8['float']:<4d} "
                  f"{i8['share']:6.1%} {row.get('latency_ms', nan):8.3f} {row.get('x_fp32', nan):6.2f} "
                  f"{row.get('x_int8', nan):6.2f} {n_float:>5s} {evals:>9s} {met:>4s}")
        others = [k for k in r["rows"][FP32]["metrics"] if k != name]
        print(f"{'':20s} metric: {name}; other: {', '.join(others)}; search target: {r['target']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.any_model_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", help=f"assets folder (default: ${bench_assets.ASSETS_ENV}; needed by "
                                     f"{', '.join(ASSET_MODELS)})")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--json", help="write every figure to this JSON file")
    ap.add_argument("--out", help="folder for the quantized models (default: a new temporary folder)")
    ap.add_argument("--runs", type=int, default=50, help="latency runs per model (default: 50)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for latency (default: 1)")
    ap.add_argument("--max-drop", action="append", default=[], metavar="MODEL=DROP",
                    help="replace a model's search target by 'metric drop <= DROP' (absolute; repeatable), e.g. "
                         "digits_yolo=0 for the strictest target")
    ap.add_argument("--minilm-onnx", help="exported all-MiniLM-L6-v2 (default: the assets' export.py, which needs "
                                          "transformers)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    keys = [k for k in args.models.split(",") if k]
    unknown = [k for k in keys if k not in MODELS]
    try:
        if unknown:
            raise UserError(f"unknown model(s) {', '.join(unknown)}",
                            f"use --models with names from {', '.join(MODELS)}")
        drops = {}
        for item in args.max_drop:
            model, _, value = item.partition("=")
            try:
                drops[model] = float(value)
            except ValueError:
                raise UserError(f"--max-drop {item!r} is not MODEL=DROP", "e.g. --max-drop digits_yolo=0.005") from None
            if model not in MODELS or drops[model] < 0:
                raise UserError(f"--max-drop {item!r}: unknown model or negative drop",
                                f"use MODEL=DROP with MODEL from {', '.join(MODELS)} and DROP >= 0")
        if any(k in ASSET_MODELS for k in keys):
            bench_assets.assets_root(args.assets)  # before any work
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="any_model_bench_"))
        if args.json and not Path(args.json).parent.is_dir():
            raise UserError(f"folder of {args.json} does not exist", "create it or pick another --json path")
    except UserError as exc:
        print(f"error: {exc.message}" + (f"\nfix: {exc.fix}" if exc.fix else ""), file=sys.stderr)
        return 2
    results: dict[str, dict] = {}
    meta = {"onnxruntime": ort.__version__, "converter": converter.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "threads": args.threads, "runs": args.runs, "load_avg_start": os.getloadavg()}
    for key in keys:
        print(f"== {key}", flush=True)
        t = time.perf_counter()
        work = out / key
        work.mkdir(parents=True, exist_ok=True)
        try:
            task = load_task(key, args, work)
            if key in drops:
                task.target = AccuracyTarget(max_drop=drops[key])
                task.target_text = f"drop <= {drops[key]:g} (--max-drop)"
            results[key] = run_model(task, work, args)
        except UserError as exc:
            results[key] = {"error": str(exc)}
            print(f"  error: {exc}", flush=True)
        except Exception as exc:  # one model's crash does not end the others' rows
            results[key] = {"error": f"crashed: {type(exc).__name__}: {exc}"}
            logging.getLogger("any_model_bench").exception("%s crashed", key)
        results[key]["wall_s"] = round(time.perf_counter() - t, 1)
        if args.json:  # after every model: a long run keeps what it measured
            Path(args.json).write_text(json.dumps({"meta": meta, "models": results}, indent=2, default=str))
    meta["load_avg_end"] = os.getloadavg()
    print_table(results, args.threads, args.runs)
    print(f"\nmodels in {out}; ONNX Runtime {ort.__version__}, {os.cpu_count()} CPUs, load average "
          f"{meta['load_avg_start'][0]:.1f} at start, {meta['load_avg_end'][0]:.1f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "models": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
