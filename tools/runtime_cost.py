"""Does the search's per-layer runtime cost predict whole-model latency? (issue 28, point 5)

For each model (``--models``, default EfficientNet-Lite0 and ResNet-8; calibration: the task's first 16 images):

1. the search's cost model (:func:`converter.search.cost.runtime_costs`): the all-INT8 model and each compute layer
   alone in float, profiled on ONNX Runtime CPU (each kernel's fastest of ``--profile-runs`` runs, summed); a
   layer's cost is the difference;
2. float sets of 0, 1, 3 and 6 layers (the costliest 1 and 3, the 3 cheapest, 6 at random, seed 0), each layer
   kept in float as the search keeps it (``exclude_nodes``: its neighbours stay quantized, one float layer in ORT);
3. every set's batch-1 latency measured: median of ``--runs`` rounds, all models of one model family taking turns
   (rotated order each round: tools/benchlib/measure.compare_latency), beside two predictions:

   * ``additive``: the measured all-INT8 latency plus the set's cost (``RuntimeCosts.set_cost``: the layers' costs
     less the Q/DQ/layout boundaries shared inside islands of adjacent float layers; what the search's ``predict`` does);
   * ``scaled``: the same with the costs scaled by measured / profiled all-INT8 time (the profile's fastest-kernel
     sums leave out the dispatch and the load that a wall-clock median includes).

   and the error of each (predicted / measured - 1); the check: |error| <= 10% on every set. ``--profiled``: also
   each set's profiled kernel sum beside the profile's own prediction (all-INT8's kernel sum, profiled again in the
   same pass, plus the set's cost; and plus the former per-layer sum), the comparison a busy machine's wall clock
   cannot blur.

    python -m tools.runtime_cost [--assets DIR] [--models efficientnet_lite0,resnet8] [--threads 1] [--runs 200]
        [--profile-runs 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from converter import QuantConfig
from converter.ort_session import runtime_layers
from converter.pipeline import calibrate, encode_model, plan_model, prepare
from converter.quant.control_flow import render_control_flow
from converter.quant.encode import activation_tensors
from converter.quant.layers import plan_layers
from converter.search.cost import COMPUTE_OPS, profiled_ms, runtime_costs

from .benchlib import assets as bench_assets
from .benchlib.measure import compare_latency

TASKS = {"efficientnet_lite0": bench_assets.efficientnet_task, "resnet8": bench_assets.resnet8_task}
LIMIT = 0.10


def model_rows(key: str, args) -> dict:
    task = TASKS[key](bench_assets.assets_root(args.assets))
    calib = task.calib[:1]  # one batch: the first 16 images
    prepared = prepare(onnx.load(str(task.model)), key)
    config = QuantConfig(threads=args.threads)
    full, _ = plan_model(prepared, config)
    calibrated = calibrate(prepared, activation_tensors(full), calib, config)
    layers = [x for x in plan_layers(full, prepared.idx) if x.op_type in COMPUTE_OPS]
    groups = {x.name: x.nodes for x in layers}

    def render(names) -> onnx.ModelProto:
        """The QDQ model with ``names`` in float (their neighbours quantized), from the same calibration."""
        cfg = config.replace(exclude_nodes=tuple(n for name in names for n in groups[name]))
        plan, subs = plan_model(prepared, cfg)
        encode_model(prepared, plan, subs, calibrated.observers, calibrated.methods, cfg)
        return render_control_flow(prepared.model, plan.encodings)

    t = time.perf_counter()
    int8 = render([])
    costs = runtime_costs(int8, task.feed, list(groups), render, runs=args.profile_runs, threads=args.threads)
    c = costs.costs()
    by_cost = sorted(c, key=lambda n: (-c[n], n))
    rng = np.random.default_rng(0)
    sets = {"0 (all-INT8)": (), "1 costliest": tuple(by_cost[:1]), "3 costliest": tuple(by_cost[:3]),
            "3 cheapest": tuple(by_cost[-3:]),
            "6 random": tuple(sorted(rng.choice(sorted(c), min(6, len(c)), replace=False)))}
    models = {"fp32": onnx.load(str(task.model)), **{label: render(s) if s else int8 for label, s in sets.items()}}
    costs_s = time.perf_counter() - t
    load_before = os.getloadavg()[0]
    ms = compare_latency(models, task.feed, runs=args.runs, warmup=5, threads=args.threads)
    load_after = os.getloadavg()[0]
    base_wall = ms["0 (all-INT8)"]
    scale = base_wall / costs.int8_ms
    rows = []
    base_profiled = profiled_ms(int8, task.feed, args.profile_runs, args.threads) if args.profiled else costs.int8_ms
    for label, s in sets.items():
        run = runtime_layers(models[label])
        extra = costs.set_cost(s)  # islands share their boundary (what the search's predict does)
        summed = sum(costs.cost(n) for n in set(s))  # the former per-layer sum, for comparison
        additive, scaled = base_wall + extra, base_wall + scale * extra
        # the profile's own prediction: all-INT8's kernel sum (profiled again in this pass, so that both sides of
        # the comparison come from sessions of the same moment) plus the set's cost
        kernel = base_profiled + extra
        rows.append({"set": label, "float": list(s), "ort_float_layers": list(run.float_layers),
                     "kernel_predicted_ms": round(kernel, 3), "kernel_summed_ms": round(base_profiled + summed, 3),
                     "measured_ms": round(ms[label], 3), "additive_ms": round(additive, 3),
                     "additive_error": round(additive / ms[label] - 1, 4), "scaled_ms": round(scaled, 3),
                     "scaled_error": round(scaled / ms[label] - 1, 4),
                     "profiled_ms": round(profiled_ms(models[label], task.feed, args.profile_runs, args.threads), 3)
                     if args.profiled else None, "vs_fp32": round(ms[label] / ms["fp32"], 3)})
    return {"model": key, "fp32_ms": round(ms["fp32"], 3), "int8_profiled_ms": round(costs.int8_ms, 3),
            "wall_over_profiled": round(scale, 3), "layers": len(groups), "costs_s": round(costs_s, 1),
            "load": [round(load_before, 1), round(load_after, 1)], "rows": rows, "costs_ms": c}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.runtime_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", help=f"assets folder (default: ${bench_assets.ASSETS_ENV})")
    ap.add_argument("--models", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default: 1)")
    ap.add_argument("--runs", type=int, default=200, help="latency rounds, models taking turns (default: 200)")
    ap.add_argument("--profile-runs", type=int, default=20, help="profiled runs per model for the costs (default 20)")
    ap.add_argument("--profiled", action="store_true", help="also profile every set (its kernels' sum)")
    ap.add_argument("--json", type=Path, help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    out, ok = [], True
    for key in args.models.split(","):
        r = model_rows(key, args)
        out.append(r)
        print(f"{key}: batch 1, {args.threads} thread(s), {r['layers']} compute layers costed in {r['costs_s']} s; "
              f"FP32 {r['fp32_ms']:.3f} ms; all-INT8 profiled {r['int8_profiled_ms']:.3f} ms, measured "
              f"{r['rows'][0]['measured_ms']:.3f} ms (x{r['wall_over_profiled']:.2f}); load {r['load']} on "
              f"{os.cpu_count()} cores")
        print(f"  {'float set':14s} {'ORT float':>9s} {'measured':>9s} {'additive':>9s} {'error':>7s} "
              f"{'scaled':>9s} {'error':>7s} {'vs FP32':>7s}")
        for row in r["rows"]:
            print(f"  {row['set']:14s} {len(row['ort_float_layers']):>9d} {row['measured_ms']:>9.3f} "
                  f"{row['additive_ms']:>9.3f} {row['additive_error']:>+7.1%} {row['scaled_ms']:>9.3f} "
                  f"{row['scaled_error']:>+7.1%} {row['vs_fp32']:>7.2f}")
            if row["profiled_ms"] is not None:
                print(f"  {'':14s} kernels: predicted {row['kernel_predicted_ms']:.3f} ms, profiled "
                      f"{row['profiled_ms']:.3f} ms ({row['kernel_predicted_ms'] / row['profiled_ms'] - 1:+.1%}); "
                      f"per-layer sum {row['kernel_summed_ms']:.3f} ms "
                      f"({row['kernel_summed_ms'] / row['profiled_ms'] - 1:+.1%})")
            ok &= abs(row["scaled_error"]) <= LIMIT
    print(f"scaled prediction within {LIMIT:.0%} on every set: {'yes' if ok else 'no'}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
