"""Per-tensor calibration choice (``calib_method: auto``): each activation's range is chosen among candidates in two
steps, by the error at the layer reading it, then by the error at the model's outputs.

Candidates (``calib_auto_candidates``: methods, or ``percentile:<p>``) are ranges computed from the histogram the
calibration pass already collected for the tensor (``auto`` tensors get a histogram observer): no calibration pass
per candidate.

**Step 1, layer-level** (:func:`choose`): each candidate is scored by the error it causes **at the consuming layer's
output**, as AMD Quark's per-layer percentile search does:

* the *layer* of a tensor ``t`` is every node from ``t``'s readers up to the next quantized activations (or model
  outputs): a fused Conv+Relu, a decomposed LayerNorm or GELU block, a MatMul through the Reshape/Transpose that
  share its encoding; its weights are quantized with their encodings (this runs after they exist), its other
  inputs are float (the float model's values), its bias is float;
* the error is ``sum ||y_q - y||^2 / sum ||y||^2`` over the layer's outputs ``y`` (the float model's values), summed
  over the layer's outputs; a tensor nothing reads in the main graph (a model output) is scored by its own error.

One run of a probe model (every tensor's layer, side by side, fed float inputs) scores one candidate for every
tensor at once: ``K`` layer-sized passes for ``K`` candidates. The layer output sees what the tensor's own MSE
(``calib_method: mse``) misses (a MatMul barely reading an outlier channel, a Softmax or Tanh saturating on the
outliers), but not what happens downstream: on MiniLM it clips the few outlier tokens' values (each layer's
squared error barely weighs them) that the rest of the model, through LayerNorm and attention, weighs much.

**Step 2, propagated** (:func:`refine`, skipped with ``calib_auto_evals: 0``): the error that counts is at the
model's outputs, ``sum ||y_q - y||^2 / sum ||y||^2`` per output (summed over the outputs), with *every* planned
activation and weight quantized as the exported model will be. One model with float fake-quantizers (scale, zero
point and clip bounds of each ``auto`` group as graph inputs, the other tensors' encodings as constants) scores any
assignment in one run over the ``calib_auto_samples`` samples. The search, bounded by ``calib_auto_evals``
model evaluations:

1. starts: the layer-level choice, and each candidate for every tensor (``1 + K`` evaluations); the best is kept;
2. moves: each group whose layer-level best differs from its current candidate, in order of the layer-level gain
   of that move (largest first), is moved there where the model error drops (one evaluation each), until the
   budget is spent.

So the result is never worse (on these samples, at the model's outputs) than the layer-level choice or any single
method, and per tensor it departs from the best single method only where the model's error says so. Why not a
full per-tensor search at the model output: ``K x N`` model runs for ``N`` tensors (MiniLM: 113 x 6), and an order
to choose them in; the layer-level gains give the order and the moves worth trying.

Memory: per capture run (at most :data:`RUN_SAMPLES` samples) the float values the probe reads (about one copy
of the model's activations) and its outputs for one candidate at a time; nothing proportional to the number of
samples; step 2 holds one copy of the model (weights fake-quantized), the ``calib_auto_samples`` inputs and the
float model's outputs on them. Candidates with the same encoding are scored once. Ties go to the earlier candidate (``minmax`` first
by default). A tensor in a scale group (Concat inputs) is scored alone; the group's encoding then spans the
chosen ranges of its members, as for any method.

The report's ``calib_choice`` block lists per tensor the candidates' layer-level errors, the layer-level choice
(``layer_choice``) and the final ``choice``; ``propagated`` gives the starts' model errors, the start kept, the
groups moved, the evaluations and the final model error; and
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


def units(state: FlowState, tensors: list[str]) -> dict[str, list[str]]:
    """The tensors by scale group (members share one encoding: a Reshape/Transpose after a MatMul, Concat inputs):
    one choice per group, scored with every member quantized."""
    out: dict[str, list[str]] = {}
    for t in tensors:
        out.setdefault(state.plan.tensors[t].group or t, []).append(t)
    return out


def candidate_encodings(state: FlowState, members: list[str], candidates: tuple[str, ...]) -> list[Any]:
    """The encoding each candidate gives the group of ``members`` (from their histograms, as
    :func:`converter.quant.encode.compute_encodings` would: the members' ranges joined)."""
    first = state.plan.tensors[members[0]]
    out = []
    for spec in candidates:
        los, his = zip(*(observer_range(state.calib.observers[m], spec, state.config.percentile,
                                        state.plan.tensors[m].symmetric, state.plan.tensors[m].bitwidth)
                         for m in members))
        out.append(encoding_from_range(min(los), max(his), first.bitwidth, first.signed, first.symmetric))
    return out


def _layer(state: FlowState, members: list[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """(nodes, output tensors) of the layer reading ``members``: forward from their readers to the next quantized
    activations outside their scale group, or model outputs (module doc)."""
    idx, plan = state.idx, state.plan
    group = plan.tensors[members[0]].group
    acts = {t.name: t for t in plan.by_role("activation")}
    nodes: dict[str, onnx.NodeProto] = {}
    outputs: list[str] = []
    frontier = list(members)
    while frontier:
        name = frontier.pop(0)
        for node in idx.uses(name):
            if node.name in nodes:
                continue
            if any(True for _ in graph_attrs(node)) or len(nodes) >= MAX_LAYER_NODES:
                if name not in members and name not in outputs:
                    outputs.append(name)  # the layer ends here: compare what reaches this node
                continue
            nodes[node.name] = node
            for o in node.output:
                if not o or o in outputs:
                    continue
                q = acts.get(o)
                if (q is not None and q.group != group) or o in idx.graph_outputs:
                    outputs.append(o)
                elif idx.uses(o) and o not in members:
                    frontier.append(o)
    order = sorted(nodes.values(), key=lambda n: idx.order.get(n.name, 0))
    return order, outputs


def fake_quantize(x: np.ndarray, enc: Any) -> np.ndarray:
    """``x`` through a per-tensor QuantizeLinear/DequantizeLinear (in float32, without the integer array)."""
    s, z = np.float32(enc.scale[0]), np.float32(enc.zero_point[0])
    buf = np.divide(x, s, dtype=np.float32)
    np.rint(buf, out=buf)
    buf += z
    np.clip(buf, np.float32(enc.qmin), np.float32(enc.qmax), out=buf)
    buf -= z
    buf *= s
    return buf


class _Probe:
    """Every group's layer, side by side in one model: group ``i``'s layer reads ``__cq{i}_{j}`` (its member ``j``
    fake-quantized with the candidate) where the model reads the member, its other inputs under their own names
    (fed the float values), its weights quantized; its outputs are ``__cc{i}/<name>``."""

    def __init__(self, state: FlowState, groups: dict[str, list[str]]) -> None:
        self.state = state
        self.layers: dict[str, tuple[list[onnx.NodeProto], list[str]]] = {}
        for root, members in groups.items():
            nodes, outs = _layer(state, members)
            if nodes and outs:
                self.layers[root] = (nodes, outs)
        self.groups = groups
        self.external: list[str] = []  # float inputs of the probe (values of the float model)
        self.entries: dict[str, list[tuple[str, str]]] = {}  # root -> [(probe input, member)]
        self.outputs: dict[str, list[tuple[str, str]]] = {}  # root -> [(probe output, float model tensor)]
        self._nodes: list[onnx.NodeProto] = []
        self._inits: dict[str, onnx.TensorProto] = {}
        self._build_nodes()

    def _build_nodes(self) -> None:
        idx, plan = self.state.idx, self.state.plan
        weights = {t.name for t in plan.by_role("weight")}
        ext: dict[str, None] = {}
        for i, (root, (nodes, outs)) in enumerate(self.layers.items()):
            inner = {o for n in nodes for o in n.output if o}
            rename = {o: f"__cc{i}/{o}" for o in inner}
            entries = [m for m in self.groups[root] if m not in inner]  # members computed inside come out quantized
            for j, m in enumerate(entries):
                rename[m] = f"__cq{i}_{j}"
            self.entries[root] = [(rename[m], m) for m in entries]
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
            self.outputs[root] = [(rename[o], o) for o in outs]
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
        inputs = self.external + [q for entries in self.entries.values() for q, _ in entries]
        g = helper.make_graph(
            self._nodes, "calib_choice_probe",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(dtypes[n]), None) for n in inputs],
            [helper.make_empty_tensor_value_info(o) for outs in self.outputs.values() for o, _ in outs],
            list(self._inits.values()))
        model = helper.make_model(g, opset_imports=list(src.opset_import), ir_version=src.ir_version)
        model.functions.extend(src.functions)
        return make_session(model, self.state.providers, self.state.config.threads)


def _sq(d: np.ndarray) -> float:
    d = d.reshape(-1)
    return float(np.dot(d, d))


def choose(state: FlowState, tensors: list[str]) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensor -> {"errors": {candidate: error}, "choice": candidate, "layer": [outputs compared]}, samples scored
    on); the members of one scale group get the same record."""
    config = state.config
    cands = tuple(config.calib_auto_candidates)
    groups = units(state, tensors)
    encs = {r: candidate_encodings(state, m, cands) for r, m in groups.items()}
    # candidates with the same encoding are scored once: slot k of group r scores its k-th distinct encoding
    uniq = {r: list(dict.fromkeys(e)) for r, e in encs.items()}
    slots = max(len(u) for u in uniq.values())
    probe = _Probe(state, groups)
    plain = [r for r in groups if r not in probe.layers]  # scored by their own error
    width = {r: max(1, len(probe.outputs.get(r, [])) if r in probe.layers else len(groups[r])) for r in groups}
    num = {r: np.zeros((slots, width[r])) for r in groups}
    den = {r: np.zeros(width[r]) for r in groups}
    refs = {o for outs in probe.outputs.values() for _, o in outs}
    fetch = list(dict.fromkeys(tensors + probe.external + sorted(refs)))
    names = [o for r in probe.layers for o, _ in probe.outputs[r]]
    session = None
    data = state.data(config.calib_auto_samples)
    runs = (part for batch in data for part, _ in _split(batch, RUN_SAMPLES))
    samples = 0
    with tqdm(total=config.calib_auto_samples, desc="choosing ranges", unit="sample", disable=None,
              leave=False) as bar:
        for values in iter_capture(state.model, fetch, runs, state.providers):
            n = int(values[tensors[0]].shape[0])
            if probe.layers and session is None:
                session = probe.session({x: values[x].dtype for x in probe.external}
                                        | {q: values[m].dtype for e in probe.entries.values() for q, m in e})
            for r in plain:
                for j, m in enumerate(groups[r]):
                    x = values[m].astype(np.float32, copy=False)
                    den[r][j] += _sq(x)
                    for k, enc in enumerate(uniq[r]):
                        num[r][k, j] += _sq(fake_quantize(x, enc) - x)
            ref_sq = {o: _sq(values[o].astype(np.float32, copy=False)) for o in refs
                      if np.issubdtype(values[o].dtype, np.floating)}
            for r in probe.layers:
                for j, (_, o) in enumerate(probe.outputs[r]):
                    den[r][j] += ref_sq.get(o, 0.0)
            for k in range(slots if session is not None else 0):
                feeds = {x: values[x] for x in probe.external}
                for r, entries in probe.entries.items():
                    enc = uniq[r][min(k, len(uniq[r]) - 1)]
                    for q, m in entries:
                        feeds[q] = fake_quantize(values[m], enc).astype(values[m].dtype, copy=False)
                got = dict(zip(names, session.run(names, feeds)))
                for r in probe.layers:
                    if k >= len(uniq[r]):
                        continue
                    for j, (o, ref_name) in enumerate(probe.outputs[r]):
                        if ref_name in ref_sq:
                            num[r][k, j] += _sq(got[o].astype(np.float32, copy=False) - values[ref_name])
                del got, feeds
            samples += n
            bar.update(n)
            del values
    out = {}
    for r, members in groups.items():
        per_enc = (num[r] / np.maximum(den[r], _EPS)[None, :]).sum(axis=1)
        errors = {spec: float(per_enc[uniq[r].index(e)]) for spec, e in zip(cands, encs[r])}
        best = min(cands, key=lambda s: (errors[s], cands.index(s)))
        record = {"errors": {s: float(f"{v:.4g}") for s, v in errors.items()}, "choice": best,
                  "layer": [o for _, o in probe.outputs[r]] if r in probe.layers else ["(its own values)"]}
        if len(members) > 1:
            record["group"] = members
        for m in members:
            out[m] = record
    log.info("calib_choice: ranges of %d tensors (%d groups) chosen on %d samples", len(tensors), len(groups), samples)
    return out, samples


# --- the propagated refinement: candidates scored by the error at the model's outputs ------------------------------
_FQ = ("s", "z", "lo", "hi")  # a fake-quantizer's parameters: scale, zero point, qmin, qmax (float scalars)


def _fq_params(enc: Any) -> list[np.ndarray]:
    return [np.asarray(v, np.float32) for v in (enc.scale[0], enc.zero_point[0], enc.qmin, enc.qmax)]


class _Whole:
    """The model with every planned per-tensor activation fake-quantized in float ops (``Div, Round, Add, Max, Min,
    Sub, Mul``: :func:`fake_quantize`) and its planned weights fake-quantized: the quantized model's arithmetic,
    with each chosen group's scale, zero point and clip bounds as graph inputs, so that one session scores any
    assignment of candidates (a feed each)."""

    def __init__(self, state: FlowState, groups: dict[str, list[str]], dtypes: dict[str, np.dtype]) -> None:
        src, plan, idx = state.model, state.plan, state.idx
        owner = {m: r for r, members in groups.items() for m in members}
        acts = [t.name for t in plan.by_role("activation") if t.name in plan.encodings
                and plan.encodings[t.name].axis is None and plan.encodings[t.name].block_size is None
                and dtypes.get(t.name) == np.float32 and (idx.uses(t.name) or t.name in idx.graph_outputs)]
        model = onnx.ModelProto()
        model.CopyFrom(src)
        g = model.graph
        for init in g.initializer:
            if init.name in plan.encodings and plan.tensors.get(init.name) is not None \
                    and plan.tensors[init.name].role == "weight":
                w = numpy_helper.to_array(init)
                init.CopyFrom(numpy_helper.from_array(plan.encodings[init.name].fake_quantize(w).astype(w.dtype),
                                                      init.name))
        self.roots = [r for r in groups if any(m in acts for m in groups[r])]
        inputs: list[str] = []
        fq_nodes: dict[str, list[onnx.NodeProto]] = {}
        for t in acts:
            r = owner.get(t)
            if r is not None:
                names = [f"__fp/{r}/{k}" for k in _FQ]
                if names[0] not in inputs:
                    inputs.extend(names)
            else:
                names = [f"__fk/{t}/{k}" for k in _FQ]
                g.initializer.extend(numpy_helper.from_array(v, n)
                                     for n, v in zip(names, _fq_params(plan.encodings[t])))
            s, z, lo, hi = names
            p = f"__fq/{t}"
            fq_nodes[t] = [helper.make_node(op, ins, [out], name=out) for op, ins, out in (
                ("Div", [t, s], p + "/d"), ("Round", [p + "/d"], p + "/r"), ("Add", [p + "/r", z], p + "/a"),
                ("Max", [p + "/a", lo], p + "/lo"), ("Min", [p + "/lo", hi], p + "/hi"),
                ("Sub", [p + "/hi", z], p + "/c"), ("Mul", [p + "/c", s], p))]
        nodes = [n for t in acts if t not in idx.producer for n in fq_nodes[t]]  # graph inputs first
        for node in g.node:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            for k, x in enumerate(new.input):
                if x in fq_nodes:
                    new.input[k] = f"__fq/{x}"
            nodes.append(new)
            nodes.extend(n for o in node.output if o in fq_nodes for n in fq_nodes[o])
        del g.node[:]
        g.node.extend(nodes)
        outs = [o.name for o in src.graph.output]
        del g.output[:]
        self.outputs = [(f"__fq/{o}" if o in fq_nodes else o, o) for o in outs]
        g.output.extend(helper.make_empty_tensor_value_info(n) for n, _ in self.outputs)
        g.input.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, []) for n in inputs)
        self.session = make_session(model, state.providers, state.config.threads)
        self.ref = make_session(src, state.providers, state.config.threads)

    def error(self, feeds: list[dict[str, np.ndarray]], refs: list[list[np.ndarray]],
              params: dict[str, Any]) -> float:
        """Relative squared error at the model's outputs, summed over them, with group ``r`` at ``params[r]``."""
        extra = {f"__fp/{r}/{k}": v for r in self.roots for k, v in zip(_FQ, _fq_params(params[r]))}
        names = [n for n, _ in self.outputs]
        num = np.zeros(len(names))
        den = np.zeros(len(names))
        for feed, ref in zip(feeds, refs):
            for j, got in enumerate(self.session.run(names, feed | extra)):
                if ref[j] is None:
                    continue
                num[j] += _sq(got.astype(np.float32, copy=False) - ref[j])
                den[j] += _sq(ref[j])
        return float((num / np.maximum(den, _EPS)).sum())


def refine(state: FlowState, groups: dict[str, list[str]], cands: tuple[str, ...], encs: dict[str, list[Any]],
           layer_errors: dict[str, dict[str, float]], layer_best: dict[str, str]
           ) -> tuple[dict[str, str], dict[str, Any]]:
    """The choice refined by the error at the model's outputs (module doc): the starts (the layer-level choice and
    each candidate for every group) scored, the best kept, then each group whose layer-level best differs from its
    current candidate tried there, largest layer-level gain first, kept where the model's error drops; at most
    ``calib_auto_evals`` model evaluations on ``calib_auto_samples`` samples."""
    budget = state.config.calib_auto_evals
    feeds = [part for batch in state.data(state.config.calib_auto_samples) for part, _ in _split(batch, RUN_SAMPLES)]
    first = next(iter_capture(state.model, [m for ms in groups.values() for m in ms], iter(feeds[:1]),
                              state.providers))
    whole = _Whole(state, groups, {t: v.dtype for t, v in first.items()})
    out_names = [o for _, o in whole.outputs]
    refs = []
    for feed in feeds:
        got = whole.ref.run(out_names, feed)
        refs.append([g.astype(np.float32) if np.issubdtype(g.dtype, np.floating) else None for g in got])
    enc_of = {r: dict(zip(cands, encs[r])) for r in groups}
    starts = {"layer": layer_best} | {c: {r: c for r in groups} for c in cands}
    scores: dict[str, float] = {}
    evals = 0
    current, best, start = layer_best, None, "layer"
    with tqdm(total=budget, desc="choosing ranges (model error)", unit="eval", disable=None, leave=False) as bar:
        for name, assign in starts.items():
            if evals >= budget:
                break
            scores[name] = whole.error(feeds, refs, {r: enc_of[r][assign[r]] for r in whole.roots})
            evals += 1
            bar.update(1)
            if best is None or scores[name] < best:
                current, best, start = dict(assign), scores[name], name
        gains = sorted((r for r in whole.roots if layer_best[r] != current[r]),
                       key=lambda r: (-(layer_errors[r][current[r]] - layer_errors[r][layer_best[r]]), r))
        accepted = []
        for r in gains:
            if evals >= budget:
                break
            if enc_of[r][layer_best[r]] == enc_of[r][current[r]]:
                continue
            trial = current | {r: layer_best[r]}
            err = whole.error(feeds, refs, {g: enc_of[g][trial[g]] for g in whole.roots})
            evals += 1
            bar.update(1)
            if err < best:
                current, best = trial, err
                accepted.append(r)
    log.info("calib_choice: model-output refinement: start %s, %d of %d groups moved to their layer-level choice, "
             "%d evaluations, error %.4g", start, len(accepted), len(gains), evals, best)
    return current, {"evaluations": evals, "starts": {k: float(f"{v:.4g}") for k, v in scores.items()},
                     "start": start, "moved": accepted, "model_error": float(f"{best:.4g}")}


def run(state: FlowState) -> dict[str, Any] | None:
    tensors = auto_tensors(state)
    if not tensors:
        return None
    chosen, samples = choose(state, tensors)
    propagated = None
    if state.config.calib_auto_evals > 0:
        groups = units(state, tensors)
        cands = tuple(state.config.calib_auto_candidates)
        encs = {r: candidate_encodings(state, m, cands) for r, m in groups.items()}
        final, propagated = refine(state, groups, cands, encs, {r: chosen[m[0]]["errors"] for r, m in groups.items()},
                                   {r: chosen[m[0]]["choice"] for r, m in groups.items()})
        for r, members in groups.items():
            record = chosen[members[0]] | {"layer_choice": chosen[members[0]]["choice"], "choice": final[r]}
            for m in members:
                chosen[m] = record
    for t, c in chosen.items():
        state.calib.methods[t] = c["choice"]
    state.reencode()
    counts: dict[str, int] = {}
    for c in chosen.values():
        counts[c["choice"]] = counts.get(c["choice"], 0) + 1
    out = {"error": "relative squared error at the outputs of the layer reading the tensor (float inputs, "
                    "quantized weights)" + ("; then refined by the relative squared error at the model's outputs "
                                           "(everything quantized)" if propagated else ""), "samples": samples,
            "candidates": list(state.config.calib_auto_candidates), "chosen": dict(sorted(counts.items())),
           "tensors": chosen, "calib_overrides": {t: c["choice"] for t, c in chosen.items()}}
    if propagated:
        out["propagated"] = propagated
    return out


def _enabled(config: Any) -> bool:
    return config.calib_method == "auto" or "auto" in dict(config.calib_overrides).values()


TECHNIQUE = Technique(
    "calib_choice", ENCODED_STAGE, run, enabled=_enabled, samples=SAMPLES,
    data_why="it scores each activation's candidate ranges on calibration samples",
    flag="--calib-method auto / calib_method: auto", searchable=True, switch=(("calib_method", "auto"),),
    config_fields=("calib_method", "calib_overrides", "calib_auto_candidates", "calib_auto_samples", "calib_auto_evals",
                   "percentile"),
    summary="chooses each activation's range (method or percentile) by the error at the layer reading it, refined "
            "by the error at the model's outputs")
