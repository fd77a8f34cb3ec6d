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
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import onnx

from ..calib.runner import make_session
from ..progress import tqdm
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


BOUNDARY_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ReorderInput",
                          "ReorderOutput", "Transpose"})  # what ORT puts between a float layer and its neighbours


@dataclass(frozen=True)
class Side:
    """One side (input or output) of a layer's kernel in ONNX Runtime's optimized graph: the milliseconds of the
    Q/DQ and layout nodes between it and the next kernels (:data:`BOUNDARY_OPS`), and the layers those kernels
    belong to; ``external``: some of them belong to no layer (a graph input/output, a QLinearAdd)."""

    ms: float
    layers: frozenset
    external: bool


def _sides(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], runs: int, threads: int,
           layers: list[str]) -> tuple[float, dict[str, tuple[Side, Side]], dict[str, float]]:
    """One profiled session of ``model``: its kernel sum (each kernel's fastest run) and, per layer of ``layers``
    that has a kernel, its input and output :class:`Side` and its own kernels' milliseconds."""
    from ..ort_session import LayerNames, profile_node_runs

    node_runs, optimized = profile_node_runs(model, feed, runs, threads=threads)
    best = {k: float(np.min(v)) for k, v in node_runs.items()}
    layer_of = LayerNames(model)
    nodes = list(optimized.graph.node)
    owner = {id(n): None if n.op_type in BOUNDARY_OPS else layer_of(n) for n in nodes}  # Q/DQ/layout: no layer's
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, list] = {}
    for n in nodes:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    outputs = {o.name for o in optimized.graph.output}
    constants = {i.name for i in optimized.graph.initializer}

    def walk(kernels: list, forward: bool) -> Side:
        seen, ms, found, external = set(), 0.0, set(), False
        todo = [t for k in kernels for t in (k.output if forward else k.input) if t]
        while todo:
            t = todo.pop()
            nxt = readers.get(t, []) if forward else [producer[t]] if t in producer else []
            if forward and t in outputs or not forward and not nxt and t not in constants:
                external = True
            for n in nxt:
                if id(n) in seen or any(n is k for k in kernels):
                    continue
                seen.add(id(n))
                if n.op_type in BOUNDARY_OPS:
                    ms += best.get(n.name, 0.0)
                    todo += [x for x in (n.output if forward else n.input) if x]
                elif owner[id(n)] is None:
                    external = True
                else:
                    found.add(owner[id(n)])
        return Side(ms, frozenset(found), external)

    sides, own = {}, {}
    for n in nodes:
        if owner[id(n)] is not None:
            own[owner[id(n)]] = own.get(owner[id(n)], 0.0) + best.get(n.name, 0.0)
    for layer in layers:
        kernels = [n for n in nodes if owner[id(n)] == layer]
        if kernels:
            sides[layer] = (walk(kernels, False), walk(kernels, True))
    return sum(best.values()), sides, own


@dataclass
class RuntimeCosts:
    """What each layer costs in float on ONNX Runtime CPU, measured (ms, batch 1).

    ``int8_ms``: the all-INT8 model's profiled time (its kernels' fastest times summed). ``alone``: per layer, the
    same for the model with only that layer in float. A layer's cost is the difference: its float kernel (a plain
    Conv inside a quantized model, not the FP32 model's NCHWc one) and the Q/DQ and layout changes around it, less
    its integer kernel.

    A float set's cost is not the sum of its layers' costs: adjacent float layers (an *island*) pass the tensor
    between them in float, so the Q/DQ (and layout change) each one paid alone on that edge is paid by neither.
    ``local``: the same per layer, from the nodes around it only (:meth:`delta`). ``boundary``: per layer, what its
    input and its output side cost more alone in float than in the all-INT8 model (the Q/DQ/layout nodes between
    its kernel and its neighbours', from the same profiles), and which layers sit on the other side;
    :meth:`set_cost` subtracts a side's cost where every layer across it is in the set too."""

    int8_ms: float
    alone: dict[str, float]
    runs: int
    kind: str = "ort-cpu-ms"
    boundary: dict[str, tuple[Side, Side]] = field(default_factory=dict)
    local: dict[str, float] = field(default_factory=dict)

    def delta(self, layer: str) -> float:
        """What ``layer`` alone in float adds: its own kernels and its two sides, float minus INT8 (``local``: the
        same profiles, but only the nodes around the layer, so the other kernels' timer noise stays out), else
        the whole profiled sums' difference."""
        if layer in self.local:
            return self.local[layer]
        return self.alone[layer] - self.int8_ms if layer in self.alone else 0.0

    def cost(self, layer: str) -> float:
        """Milliseconds a batch-1 run gains when ``layer`` runs in float instead of INT8 (0 if it got faster)."""
        return max(self.delta(layer), 0.0)

    def costs(self) -> "LayerCosts":
        """Every profiled layer's :meth:`cost`, rounded to 10 us so that timer noise below that cannot reorder
        layers between two runs of the search; the result also costs float sets (:meth:`LayerCosts.set_cost`)."""
        return LayerCosts({k: round(self.cost(k), 2) for k in sorted(self.alone)}, model=self)

    def set_cost(self, float_layers) -> float:
        """Milliseconds a batch-1 run gains with ``float_layers`` in float: each layer's own cost, less the
        boundary sides shared inside an island (both ends in float: the tensor crosses in float, no Q/DQ)."""
        names = set(float_layers)
        total = 0.0
        for x in names:
            if x not in self.alone:
                continue
            total += self.cost(x)  # never below 0: timer noise must not make a superset look cheaper
            for side in self.boundary.get(x, ()):
                if side.layers and not side.external and side.layers <= names:
                    total -= max(side.ms, 0.0)  # sharing only ever removes work
        return max(total, 0.0)

    def predict(self, int8_ms: float, float_layers) -> float:
        """Predicted batch-1 latency with ``float_layers`` in float, from the all-INT8 model's latency
        (:meth:`set_cost`)."""
        return int8_ms + self.set_cost(float_layers)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "runs": self.runs, "int8_profiled_ms": round(self.int8_ms, 3)}


class LayerCosts(dict):
    """Per-layer costs (ms) that also cost a float set as a whole (:meth:`RuntimeCosts.set_cost`): what the search's
    choice among sets that met the target (``_best``) and its give-back order use."""

    def __init__(self, costs: Mapping[str, float], model: RuntimeCosts | None = None) -> None:
        super().__init__(costs)
        self.model = model

    def copy(self) -> "LayerCosts":
        return LayerCosts(self, self.model)

    def set_cost(self, names) -> float:
        if self.model is None:
            return sum(self.get(n, 0.0) for n in set(names))
        summed = sum(self.get(n, 0.0) for n in set(names))  # islands only ever share: never above the layers' sum
        return min(round(self.model.set_cost([n for n in names if n in self.model.alone]), 2) +
                   sum(self.get(n, 0.0) for n in set(names) if n not in self.model.alone), summed)


def set_cost(costs: Mapping[str, float], names) -> float:
    """The cost of keeping ``names`` in float: :meth:`LayerCosts.set_cost` where ``costs`` can, else the sum."""
    f = getattr(costs, "set_cost", None)
    return f(names) if f is not None else sum(costs.get(n, 0.0) for n in set(names))


def profiled_ms(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], runs: int = 10, threads: int = 0) -> float:
    """A model's batch-1 time as the sum of its kernels' fastest times over ``runs`` profiled runs: steadier than
    wall time on a busy machine (preemption only ever adds time to a kernel)."""
    times, rest = profile_layer_times(model, feed, runs, threads=threads)
    return sum(times.values()) + rest


def runtime_costs(int8: onnx.ModelProto, feed: Mapping[str, np.ndarray], layers: list[str],
                  build: Callable[[list[str]], onnx.ModelProto], runs: int = 20, threads: int = 0) -> RuntimeCosts:
    """Profile the all-INT8 model and, per layer, the model with only that layer in float (``build([name])``
    renders it) on ``feed`` (batch 1: :func:`converter.calib.readers.one_sample`); see :class:`RuntimeCosts`. Each
    kernel's fastest of ``runs`` profiled runs, so that two searches on the same machine rank alike. The same
    profiles give each layer's boundary sides (:func:`_sides`): no profiling run beyond one per layer. A layer's own
    and side times are rescaled by its session's speed against the all-INT8 session's (the other layers' kernels,
    unchanged between the two, give the ratio)."""
    base, int8_sides, int8_own = _sides(int8, feed, runs, threads, layers)
    alone, boundary, local = {}, {}, {}
    for x in tqdm(layers, desc="profiling layers in float", unit="layer", leave=False):
        alone[x], sides, own = _sides(build([x]), feed, runs, threads, [x])
        if x in sides and x in int8_own:
            # this session's speed against the all-INT8 one's, from the other layers' (unchanged) kernels: a busy
            # machine slows a whole session (caches, clocks), which the fastest-of-N runs cannot take out
            others = [k for k in own if k != x and k in int8_own]
            speed = sum(own[k] for k in others) / (sum(int8_own[k] for k in others) or 1.0) if others else 1.0
            speed = min(max(speed, 0.5), 2.0) if speed > 0 else 1.0
            (ins, outs), (q_in, q_out) = sides[x], int8_sides[x]
            boundary[x] = (Side(ins.ms / speed - q_in.ms, ins.layers, ins.external),
                           Side(outs.ms / speed - q_out.ms, outs.layers, outs.external))
            local[x] = own[x] / speed - int8_own[x] + boundary[x][0].ms + boundary[x][1].ms
    return RuntimeCosts(base, alone, runs, boundary=boundary, local=local)
