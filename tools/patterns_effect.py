"""The pattern table's effect on an asset model: quantize with the target's ``patterns`` emptied
(what the planner did before op patterns) and with the preset as shipped, in one run.

Prints, for both, the accuracy vs FP32 (the asset's metric from tools/assets_smoke.py), the QDQ
model's node and Q/DQ counts, and the op counts of the graph ONNX Runtime really runs (after its
optimisations: LayerNormalization/SkipLayerNormalization/Gelu fusions, QLinear* kernels)::

    python -m tools.patterns_effect [--asset minilm] [--target ort-cpu] [--assets DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx

from converter import QuantConfig
from converter.config import TARGETS

from . import assets_smoke as smoke
from .benchlib.assets import add_assets_argument, assets_or_exit
from .benchlib.measure import quantize_any_speed


def one_run(path, calib, evaluate, config: QuantConfig, patterns: dict | None, work: Path) -> dict:
    target = TARGETS[config.target]
    if patterns is not None:
        TARGETS[config.target] = dataclasses.replace(target, patterns=patterns)
    try:
        res = quantize_any_speed(str(path), calib, config, output_dir=work, name="q")
    finally:
        TARGETS[config.target] = target
    q = onnx.load(str(res.model_path))
    ops = Counter(n.op_type for n in q.graph.node)
    return {"accuracy": evaluate(smoke.session(path), smoke.session(res.model_path)),
            "qdq_model": {"nodes": len(q.graph.node), "QuantizeLinear": ops["QuantizeLinear"],
                          "DequantizeLinear": ops["DequantizeLinear"]},
            "ort_runs": smoke.fused_counts(res.model_path, work),
            "blocks_kept_whole": dict(Counter(p["kind"] for p in res.plan.patterns if not p["qdq_inside"]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--asset", default="minilm", choices=list(smoke.ASSETS))
    ap.add_argument("--target", default="ort-cpu")
    add_assets_argument(ap)
    ap.add_argument("--n-eval", type=int, default=200)
    args = ap.parse_args()
    args.assets = assets_or_exit(args.assets)
    path, calib, evaluate, opts = smoke.ASSETS[args.asset](Path(args.assets), args.n_eval)
    config = QuantConfig(target=args.target, batch_size=opts.get("batch_size", 16))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, patterns in (("before (no patterns)", {}), ("after (preset patterns)", None)):
            rows[tag] = one_run(path, calib, evaluate, config, patterns, Path(tmp) / tag.split()[0])
            print(f"{tag:24s} {json.dumps(rows[tag])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
