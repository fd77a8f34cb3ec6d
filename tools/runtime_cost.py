"""Float counted as ONNX Runtime runs it, and cost measured on the runtime (issue 28, points 3 and 5).

EfficientNet-Lite0 (calibration: the first 16 ImageNet sample images):

1. ``--exclude-nodes /_blocks.0/_depthwise_conv/Conv_output_0``: the layers ORT CPU's optimized graph runs in float
   (by name), and batch-1 latency vs FP32 and all-INT8;
2. the per-layer cost model of the search (:func:`converter.search.cost.runtime_costs`: profiled FP32 and all-INT8
   kernel times, medians over runs): predicted vs measured batch-1 latency for a few float sets, and the same
   sets' MAC share (what the search used to minimise);
3. determinism: the cost ranking from two profiles (rank correlation, same top 10).

Latency ("wall"): the fastest of ``--reps`` rounds (models interleaved) of the median of ``--runs`` runs;
"profiled": each kernel's fastest of ``--profile-runs`` profiled runs, summed (what the search's costs use);
``--threads`` intra-op threads for both.

    python -m tools.runtime_cost [--assets /work/shared/assets] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from converter import QuantConfig
from converter.pipeline import calibrate, encode_model, plan_model, prepare
from converter.quant.control_flow import render_control_flow
from converter.quant.encode import activation_tensors
from converter.quant.layers import plan_layers
from converter.graph.macs import node_macs
from converter.ort_session import runtime_layers
from converter.search.cost import measure_latency, profiled_ms, runtime_costs
from converter.search.sensitivity import spearman

from .bench_e2e import efficientnet_task
from .benchlib.assets import add_assets_argument, assets_or_exit


EXCLUDED = "/_blocks.0/_depthwise_conv/Conv_output_0"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_assets_argument(ap)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    task = efficientnet_task(args.assets)
    calib = [{task.input_name: task.calib[i:i + 8]} for i in range(0, 16, 8)]
    feed = {task.input_name: task.calib[:1]}
    fp32 = onnx.load(str(task.model))
    prepared = prepare(fp32, "m")
    config = QuantConfig()
    full, _ = plan_model(prepared, config)
    calibrated = calibrate(prepared, activation_tensors(full), calib, config)
    idx = prepared.idx
    layers = [n for n in prepared.model.graph.node if n.op_type in ("Conv", "Gemm")]
    macs = {n.name: node_macs(idx, n) for n in layers}
    work = Path(tempfile.mkdtemp())

    groups = {layer.name: layer.nodes for layer in plan_layers(full, idx)}  # a Conv and the activation it fuses

    def render(names) -> onnx.ModelProto:
        """The QDQ model with ``names`` in float, from the same calibration (what a search trial renders)."""
        cfg = config.replace(exclude_nodes=tuple(x for n in names for x in groups.get(n, (n,))))
        plan, subs = plan_model(prepared, cfg)
        encode_model(prepared, plan, subs, calibrated.observers, calibrated.methods, cfg)
        return render_control_flow(prepared.model, plan.encodings)

    def build(key: str, exclude: tuple[str, ...]) -> Path:
        path = work / f"{key}.onnx"
        onnx.save(render(exclude), path)
        return path

    int8_path = build("int8", ())
    int8 = onnx.load(str(int8_path))
    order = [n.name for n in layers]
    costs = runtime_costs(int8, feed, order, render, runs=args.profile_runs, threads=args.threads)
    again = runtime_costs(int8, feed, order, render, runs=args.profile_runs, threads=args.threads)
    c1, c2 = costs.costs(), again.costs()
    names = sorted(c1)
    rho = spearman(sorted(names, key=lambda n: (-c1[n], n)), sorted(names, key=lambda n: (-c2[n], n)))
    top1 = sorted(names, key=lambda n: (-c1[n], n))[:10]
    top2 = sorted(names, key=lambda n: (-c2[n], n))[:10]

    by_cost = sorted(names, key=lambda n: (-c1[n], n))
    by_macs = sorted(macs, key=lambda n: (-macs[n], n))
    rng = np.random.default_rng(0)
    sets = {
        "exclude blocks.0 depthwise": (EXCLUDED,),
        "stem + blocks.0/1 depthwise (high resolution)": ("/_conv_stem/Conv_output_0", EXCLUDED,
                                                         "/_blocks.1/_depthwise_conv/Conv_output_0"),
        "5 largest by MACs": tuple(by_macs[:5]),
        "5 costliest by profile": tuple(by_cost[:5]),
        "10 random layers": tuple(sorted(rng.choice(sorted(macs), 10, replace=False))),
        "every depthwise Conv": tuple(n.name for n in layers if "depthwise" in n.name),
    }
    paths = {"fp32": Path(task.model), "all-int8": int8_path}
    for i, (label, s) in enumerate(sets.items()):
        paths[label] = build(f"set{i}", s)
    lat: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.reps):
        for key, p in paths.items():
            lat[key].append(measure_latency(str(p), feed, args.runs, threads=args.threads))
    ms = {k: float(np.min(v)) for k, v in lat.items()}  # the least disturbed round
    total_macs = sum(macs.values())
    rows = []
    print(f"EfficientNet-Lite0 batch 1, {args.threads} thread(s): FP32 {ms['fp32']:.2f} ms, all-INT8 "
          f"{ms['all-int8']:.2f} ms ({ms['all-int8'] / ms['fp32']:.2f}x)")
    print(f"cost ranking determinism: Spearman {rho:.3f} between two profiles, top 10 equal: {top1 == top2} "
          f"({len(set(top1) & set(top2))}/10 shared)")
    print(f"  {'float set':48s} {'excl':>4s} {'ORT float':>9s} {'MACs':>6s} {'predicted':>9s} {'measured':>9s} "
          f"{'error':>6s} {'vs FP32':>7s}")
    int8_profiled = profiled_ms(int8, feed, args.profile_runs, threads=args.threads)
    print(f"  (profiled: each kernel's fastest run, summed; wall: fastest round's median, machine load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    for label, s in sets.items():
        m = onnx.load(str(paths[label]))
        run = runtime_layers(m)
        prof = profiled_ms(m, feed, args.profile_runs, threads=args.threads)
        pred_prof = costs.predict(int8_profiled, run.float_layers)
        pred = costs.predict(ms["all-int8"], run.float_layers)
        err = pred / ms[label] - 1
        share = sum(macs.get(n, 0.0) for n in run.float_layers) / total_macs
        rows.append({"set": label, "excluded": list(s), "ort_float_layers": list(run.float_layers),
                     "profiled_ms": round(prof, 3), "predicted_profiled_ms": round(pred_prof, 3),
                     "profiled_error": round(pred_prof / prof - 1, 4),
                     "mac_share": round(share, 4), "predicted_ms": round(pred, 3), "measured_ms": round(ms[label], 3),
                     "error": round(err, 4), "vs_fp32": round(ms[label] / ms["fp32"], 3)})
        print(f"  {label:48s} {len(s):>4d} {len(run.float_layers):>9d} {share:>6.1%} {pred:>9.2f} {ms[label]:>9.2f} "
              f"{err:>+6.1%} {ms[label] / ms['fp32']:>7.2f}   profiled: predicted {pred_prof:.2f} measured "
              f"{prof:.2f} ({pred_prof / prof - 1:+.1%})")
    if args.json:
        args.json.write_text(json.dumps({"latency_ms": ms, "rows": rows, "spearman": rho, "top10_equal": top1 == top2,
                                         "threads": args.threads, "costs_ms": c1}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
