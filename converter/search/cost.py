"""What a layer costs to run, and what a model costs: the search's other objective.

* :func:`layer_macs`: multiply-accumulates per sample of each layer, from the shapes its tensors
  really have on a sample batch (dynamic sequence lengths included): ``Conv`` output elements times
  ``C_in / group * k_h * k_w``; ``MatMul``/``Gemm`` output elements times the reduced dimension.
  Element-wise layers and pattern blocks (LayerNorm, GELU) count one per output element: on ONNX
  Runtime CPU they run in float between a DQ and a Q whether quantized or not, so keeping them in
  float costs almost nothing.
  Layers inside If/Loop/Scan bodies have no captured values (ONNX Runtime returns main-graph tensors
  only): their MACs are *estimated* from the static shapes (weights, and the output shape that shape
  inference gave, a symbolic or unknown dimension counting 1), so a Conv whose output length is unknown
  counts its MACs per output position, and a Loop body counts one iteration.
* :func:`measure_latency`: median wall time of one ONNX Runtime CPU session run at batch 1, all
  graph optimizations on (what a deployment runs), after warm-up runs.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import onnx

from ..calib.runner import make_session
from ..graph.index import GraphIndex
from ..graph.macs import node_macs
from ..quant.layers import Layer
from ..quant.rules import RULES

COMPUTE_OPS = frozenset(op for op, rule in RULES.items() if rule.anchor)  # Conv, ConvTranspose, Gemm, MatMul


def layer_macs(idx: GraphIndex, layers: list[Layer], values: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per-sample MACs of each layer, from ``values`` (one batch of its tensors' real values, by name); a layer
    whose output is not in ``values`` (inside a body) is estimated from static shapes (see the module doc)."""
    by_name = {n.name: n for n in idx.graph.node}
    return {layer.name: node_macs(idx, by_name[layer.nodes[0]], values) for layer in layers}


def first_sample(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[:1] for k, v in batch.items()}


def measure_latency(model: onnx.ModelProto | str, feed: Mapping[str, np.ndarray], runs: int = 20,
                    warmup: int = 3, threads: int = 0) -> float:
    """Median milliseconds of one run of ``model`` on ``feed`` (ONNX Runtime CPU, all optimizations)."""
    data = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    sess = make_session(data, ["CPUExecutionProvider"], threads=threads, full_optimization=True)
    names = [i.name for i in sess.get_inputs()]
    feed = {k: v for k, v in feed.items() if k in names}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(max(runs, 1)):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))
