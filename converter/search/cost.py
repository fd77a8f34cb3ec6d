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
* :func:`runtime_costs`: what keeping each layer in float costs on ONNX Runtime CPU, measured: per-layer kernel
  times of a profiled run (:func:`converter.ort_session.profile_layer_times`, medians over runs) of the FP32 model
  and of the all-INT8 model; a layer's cost is its FP32 time minus its INT8 time. The search's objective on target
  ort-cpu (MACs elsewhere): early high-resolution layers cost far more than their MACs say (EfficientNet-Lite0).
  ``tools/runtime_cost.py`` prints predicted vs measured latency of float sets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnx

from ..calib.runner import make_session
from ..ort_session import profile_layer_times
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


@dataclass
class RuntimeCosts:
    """What each layer costs in float on ONNX Runtime CPU, measured (ms, batch 1).

    ``int8_ms``: the all-INT8 model's profiled time (its kernels' median times summed). ``alone``: per layer, the
    same for the model with only that layer in float. A layer's cost is the difference: its float kernel (a plain
    Conv inside a quantized model, not the FP32 model's NCHWc one) and the Q/DQ and layout changes around it, less
    its integer kernel."""

    int8_ms: float
    alone: dict[str, float]
    runs: int
    kind: str = "ort-cpu-ms"

    def cost(self, layer: str) -> float:
        """Milliseconds a batch-1 run gains when ``layer`` runs in float instead of INT8 (0 if it got faster)."""
        return max(self.alone[layer] - self.int8_ms, 0.0) if layer in self.alone else 0.0

    def costs(self) -> dict[str, float]:
        """Every profiled layer's :meth:`cost`, rounded to 10 us so that timer noise below that cannot reorder
        layers between two runs of the search."""
        return {k: round(self.cost(k), 2) for k in sorted(self.alone)}

    def predict(self, int8_ms: float, float_layers) -> float:
        """Predicted batch-1 latency with ``float_layers`` in float (summed: adjacent float layers share the Q/DQ
        between them, so a run of them costs a little less), from the all-INT8 model's latency."""
        return int8_ms + sum(self.cost(x) for x in set(float_layers))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "runs": self.runs, "int8_profiled_ms": round(self.int8_ms, 3)}


def profiled_ms(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], runs: int = 10, threads: int = 0) -> float:
    """A model's batch-1 time as the sum of its kernels' fastest times over ``runs`` profiled runs: steadier than
    wall time on a busy machine (preemption only ever adds time to a kernel)."""
    times, rest = profile_layer_times(model, feed, runs, threads=threads)
    return sum(times.values()) + rest


def runtime_costs(int8: onnx.ModelProto, feed: Mapping[str, np.ndarray], layers: list[str],
                  build: Callable[[list[str]], onnx.ModelProto], runs: int = 20, threads: int = 0) -> RuntimeCosts:
    """Profile the all-INT8 model and, per layer, the model with only that layer in float (``build([name])``
    renders it) on ``feed`` (batch 1: :func:`converter.calib.readers.one_sample`); see :class:`RuntimeCosts`. Each kernel's fastest of
    ``runs`` profiled runs (:func:`profiled_ms`), so that two searches on the same machine rank alike."""
    base = profiled_ms(int8, feed, runs, threads)
    return RuntimeCosts(base, {x: profiled_ms(build([x]), feed, runs, threads) for x in layers}, runs)
