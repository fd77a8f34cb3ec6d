"""Per-tensor calibration choice (``calib_method: auto``): each activation's range is the candidate with the least
error at the output of the layer that reads it.

Candidates (``calib_auto_candidates``: methods, or ``percentile:<p>``) are ranges computed from the histogram the
calibration pass already collected for the tensor (``auto`` tensors get a histogram observer): no model pass per
candidate. Each is scored by the error it causes **at the consuming layer's output**, as AMD Quark's per-layer
percentile search does, not at the model output:

* the *layer* of a tensor ``t`` is every node from ``t``'s readers up to the next quantized activations (or model
  outputs): a fused Conv+Relu, a decomposed LayerNorm or GELU block, a MatMul through the Reshape/Transpose that
  share its encoding; its weights are quantized with their encodings (this runs after they exist), its other
  inputs are float (the float model's values), its bias is float;
* the error is ``sum ||y_q - y||^2 / sum ||y||^2`` over the layer's outputs ``y`` (the float model's values), summed
  over the layer's outputs; a tensor nothing reads in the main graph (a model output) is scored by its own error.

Why at the layer output and not propagated to the model output: one run of a probe model (every tensor's layer,
side by side, fed float inputs) scores one candidate for every tensor at once, so the cost is ``K`` layer-sized
passes over ``calib_auto_samples`` samples (about ``K`` model runs), where scoring by the model output needs a
model run per tensor and candidate (``K x N``) and depends on the order the tensors are chosen in. And the
layer-output error already sees what the tensor's own MSE (``calib_method: mse``) misses: how the layer weighs
each value (a MatMul reading outlier channels, a Softmax that flattens errors in its large inputs, a Relu that
drops the negative half).

Memory: per capture run (at most :data:`RUN_SAMPLES` samples) the float values the probe reads (about one copy
of the model's activations) and its outputs for one candidate at a time; nothing proportional to the number of
samples. Candidates with the same encoding are scored once. Ties go to the earlier candidate (``minmax`` first
by default). A tensor in a scale group (Concat inputs) is scored alone; the group's encoding then spans the
chosen ranges of its members, as for any method.

The report's ``calib_choice`` block lists per tensor the candidates' errors and the choice, and
``calib_overrides``: the choices in the config's form, to paste under ``calib_overrides:`` of a config file
(that run then reproduces this model byte for byte, without the choice).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..calib.observers import observer_range
from ..calib.runner import _split, iter_capture, make_session
from ..graph.index import graph_attrs
from ..progress import tqdm
from ..quant.encoding import encoding_from_range
from .base import ENCODED_STAGE, Technique
from .state import FlowState

log = logging.getLogger("converter")

SAMPLES = 32  # default of calib_auto_samples (the contract's figure: a one-shot reader keeps at least this many)
RUN_SAMPLES = 8  # samples per capture run (bounds the float values held at once)
MAX_LAYER_NODES = 64  # a layer walk stops here (a long unquantized stretch is cut, its ends compared)
_EPS = 1e-30


def auto_tensors(state: FlowState) -> list[str]:
    """The planned activations whose method is ``auto`` (main graph, calibrated with a histogram)."""
    acts = {t.name for t in state.plan.by_role("activation")}
    return [t for t, m in state.calib.methods.items() if m == "auto" and t in acts and t in state.calib.observers]


def candidate_encodings(state: FlowState, tensor: str, candidates: tuple[str, ...]) -> list[Any]:
    """The encoding each candidate gives ``tensor`` (from its histogram, as :func:`compute_encodings` would)."""
    t = state.plan.tensors[tensor]
    obs = state.calib.observers[tensor]
    out = []
    for spec in candidates:
        lo, hi = observer_range(obs, spec, state.config.percentile, t.symmetric, t.bitwidth)
        out.append(encoding_from_range(lo, hi, t.bitwidth, t.signed, t.symmetric))
    return out


def _layer(state: FlowState, tensor: str) -> tuple[list[onnx.NodeProto], list[str]]:
    """(nodes, output tensors) of the layer reading ``tensor``: forward from its readers to the next quantized
    activations that do not share its encoding, or model outputs (module doc)."""
    idx, plan = state.idx, state.plan
    group = plan.tensors[tensor].group
    acts = {t.name: t for t in plan.by_role("activation")}
    nodes: dict[str, onnx.NodeProto] = {}
    outputs: list[str] = []
    frontier = [tensor]
    while frontier:
        name = frontier.pop(0)
        for node in idx.uses(name):
            if node.name in nodes:
                continue
            if any(True for _ in graph_attrs(node)) or len(nodes) >= MAX_LAYER_NODES:
                if name != tensor and name not in outputs:
                    outputs.append(name)  # the layer ends here: compare what reaches this node
                continue
            nodes[node.name] = node
            for o in node.output:
                if not o:
                    continue
                q = acts.get(o)
                if (q is not None and not (q.group and q.group == group)) or o in idx.graph_outputs:
                    if o not in outputs:
                        outputs.append(o)
                elif idx.uses(o):
                    frontier.append(o)
    order = sorted(nodes.values(), key=lambda n: idx.order.get(n.name, 0))
    return order, outputs


class _Probe:
    """Every scored tensor's layer, side by side in one model: tensor ``t``'s layer reads ``__cq{i}`` (``t``
    fake-quantized with the candidate) where the model reads ``t``, its other inputs under their own names (fed the
    float values), its weights quantized; its outputs are ``__cc{i}/<name>``."""

    def __init__(self, state: FlowState, tensors: list[str]) -> None:
        self.state = state
        self.layers: dict[str, tuple[list[onnx.NodeProto], list[str]]] = {}
        for t in tensors:
            nodes, outs = _layer(state, t)
            if nodes and outs:
                self.layers[t] = (nodes, outs)
        self.external: list[str] = []  # float inputs of the probe (values of the float model)
        self.outputs: dict[str, list[tuple[str, str]]] = {}  # tensor -> [(probe output, float model tensor)]
        self._nodes: list[onnx.NodeProto] = []
        self._inits: dict[str, onnx.TensorProto] = {}
        self._build_nodes()

    def _build_nodes(self) -> None:
        idx, plan = self.state.idx, self.state.plan
        weights = {t.name for t in plan.by_role("weight")}
        ext: dict[str, None] = {}
        for i, (t, (nodes, outs)) in enumerate(self.layers.items()):
            inner = {o for n in nodes for o in n.output if o}
            rename = {o: f"__cc{i}/{o}" for o in inner}
            rename[t] = f"__cq{i}"
            for n in nodes:
                new = onnx.NodeProto()
                new.CopyFrom(n)
                new.name = f"__cc{i}/{n.name}"
                for k, x in enumerate(n.input):
                    if not x or x in rename:
                        new.input[k] = rename.get(x, x)
                    elif x in idx.initializers:
                        if x in weights and x in plan.encodings:
                            new.input[k] = self._quantized_weight(x)
                        else:
                            self._inits.setdefault(x, idx.initializers[x])
                    else:
                        ext[x] = None
                for k, o in enumerate(n.output):
                    if o:
                        new.output[k] = rename[o]
                self._nodes.append(new)
            self.outputs[t] = [(rename[o] if o in rename else o, o) for o in outs]
        self.external = list(ext)

    def _quantized_weight(self, name: str) -> str:
        key = f"__cw/{name}"
        if key not in self._inits:
            w = self.state.idx.constant(name)
            self._inits[key] = numpy_helper.from_array(self.state.plan.encodings[name].fake_quantize(w)
                                                       .astype(w.dtype), key)
        return key

    def session(self, dtypes: dict[str, np.dtype]) -> Any:
        src = self.state.model
        g = helper.make_graph(
            self._nodes, "calib_choice_probe",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(dtypes[n]), None)
             for n in self.external + [f"__cq{i}" for i in range(len(self.layers))]],
            [helper.make_empty_tensor_value_info(o) for outs in self.outputs.values() for o, _ in outs
             if o.startswith("__cc")],
            list(self._inits.values()))
        model = helper.make_model(g, opset_imports=list(src.opset_import), ir_version=src.ir_version)
        model.functions.extend(src.functions)
        return make_session(model, self.state.providers, self.state.config.threads)


def _rel_error(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    d = got.astype(np.float64) - ref
    return float(np.vdot(d, d)), float(np.vdot(ref, ref))


def choose(state: FlowState, tensors: list[str]) -> dict[str, dict[str, Any]]:
    """tensor -> {"errors": {candidate: error}, "choice": candidate, "layer": [outputs compared]}."""
    config = state.config
    cands = tuple(config.calib_auto_candidates)
    encs = {t: candidate_encodings(state, t, cands) for t in tensors}
    # candidates with the same encoding are scored once: slot k of tensor t scores its k-th distinct encoding
    uniq = {t: list(dict.fromkeys(e)) for t, e in encs.items()}
    slots = max(len(u) for u in uniq.values())
    probe = _Probe(state, tensors)
    plain = [t for t in tensors if t not in probe.layers]  # scored by their own error
    refs = {o for outs in probe.outputs.values() for _, o in outs}
    fetch = list(dict.fromkeys(tensors + probe.external + sorted(refs)))
    num = {t: np.zeros((slots, max(1, len(probe.outputs.get(t, [None]))))) for t in tensors}
    den = {t: np.zeros(max(1, len(probe.outputs.get(t, [None])))) for t in tensors}
    session = None
    data = state.data(config.calib_auto_samples)
    runs = (part for batch in data for part, _ in _split(batch, RUN_SAMPLES))
    samples = 0
    with tqdm(total=config.calib_auto_samples, desc="choosing ranges", unit="sample", disable=None,
              leave=False) as bar:
        for values in iter_capture(state.model, fetch, runs, state.providers):
            n = int(next(iter(values[t] for t in tensors)).shape[0]) if tensors else 0
            if probe.layers and session is None:
                session = probe.session({x: values[x].dtype for x in probe.external}
                                        | {f"__cq{i}": values[t].dtype for i, t in enumerate(probe.layers)})
            for t in plain:
                x = values[t]
                for k, enc in enumerate(uniq[t]):
                    a, b = _rel_error(enc.fake_quantize(x), x.astype(np.float64))
                    num[t][k, 0] += a
                    if k == 0:
                        den[t][0] += b
            for k in range(slots):
                if session is None:
                    break
                feeds = {x: values[x] for x in probe.external}
                for i, t in enumerate(probe.layers):
                    enc = uniq[t][min(k, len(uniq[t]) - 1)]
                    feeds[f"__cq{i}"] = enc.fake_quantize(values[t]).astype(values[t].dtype)
                names = [o for t in probe.layers for o, _ in probe.outputs[t]]
                got = dict(zip(names, session.run(names, feeds)))
                for t in probe.layers:
                    if k >= len(uniq[t]):
                        continue
                    for j, (o, ref_name) in enumerate(probe.outputs[t]):
                        ref = values[ref_name]
                        if not np.issubdtype(ref.dtype, np.floating):
                            continue
                        a, b = _rel_error(got[o], ref.astype(np.float64))
                        num[t][k, j] += a
                        if k == 0:
                            den[t][j] += b
            samples += n
            bar.update(n)
            del values
    out = {}
    for t in tensors:
        per_enc = (num[t] / np.maximum(den[t], _EPS)[None, :]).sum(axis=1)
        errors = {spec: float(per_enc[uniq[t].index(e)]) for spec, e in zip(cands, encs[t])}
        best = min(cands, key=lambda s: (errors[s], cands.index(s)))
        out[t] = {"errors": {s: float(f"{v:.4g}") for s, v in errors.items()}, "choice": best,
                  "layer": [r for _, r in probe.outputs.get(t, [])] or ["(its own values)"]}
    log.info("calib_choice: ranges of %d tensors chosen on %d samples (%d layer(s) probed)", len(tensors), samples,
             len(probe.layers))
    return out


def run(state: FlowState) -> dict[str, Any] | None:
    tensors = auto_tensors(state)
    if not tensors:
        return None
    chosen = choose(state, tensors)
    for t, c in chosen.items():
        state.calib.methods[t] = c["choice"]
    state.reencode()
    counts: dict[str, int] = {}
    for c in chosen.values():
        counts[c["choice"]] = counts.get(c["choice"], 0) + 1
    return {"error": "relative squared error at the outputs of the layer reading the tensor (float inputs, "
                     "quantized weights)", "samples": min(state.config.calib_auto_samples, state.calib.samples),
            "candidates": list(state.config.calib_auto_candidates), "chosen": dict(sorted(counts.items())),
            "tensors": chosen, "calib_overrides": {t: c["choice"] for t, c in chosen.items()}}


def _enabled(config: Any) -> bool:
    return config.calib_method == "auto" or "auto" in dict(config.calib_overrides).values()


TECHNIQUE = Technique(
    "calib_choice", ENCODED_STAGE, run, enabled=_enabled, samples=SAMPLES,
    data_why="it scores each activation's candidate ranges on calibration samples",
    flag="--calib-method auto / calib_method: auto", searchable=True,
    config_fields=("calib_method", "calib_overrides", "calib_auto_candidates", "calib_auto_samples", "percentile"),
    summary="chooses each activation's range (method or percentile) by the error at the layer reading it")
