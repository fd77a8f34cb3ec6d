"""Model validation: what in a model stops or weakens quantization, each finding with a fix.

:func:`validate_onnx` checks an ONNX model; :func:`converter.validation.torch_checks.validate_torch` checks
a PyTorch module (reused modules, functional ops) and then its ONNX export. ``qconvert validate``
(converter/commands/validate.py) prints the findings as a table (or JSON) and exits 1 when one is an error.

A finding reads like a rewrite rule's failed check (onnxscript's rewriter): *what* (``code``),
*where* (a node name, or a module path for PyTorch findings), *why* (``message``) and *how to fix
it* (``fix``). Severities:

=========  ======================================================================================
error      quantization cannot proceed or would produce a wrong model (already quantized, opset
           below 10, ONNX Runtime cannot load the model); ``qconvert validate`` exits 1
warning    quantization works but part of the model stays float or loses accuracy (control flow,
           shared weights, custom-domain ops, huge constants in the data path)
info       handled automatically (Constant-node weights, missing node names, opset < 13 upgraded,
           recognised patterns), listed so the report explains what happened
=========  ======================================================================================

Checks are table rows (:data:`ONNX_CHECKS`): each takes a :class:`_Context` and yields findings.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from ..config import QuantConfig
from ..errors import ModelError
from ..graph.index import GraphIndex
from ..graph.model_io import is_large, load_model, proto_size
from ..graph.passes import MIN_OPSET, default_opset, preprocess
from ..graph.patterns import all_nodes as _all_nodes
from ..graph.patterns import subgraphs as _subgraphs
from ..ops import BOUNDED_OPS, HEAVY_OPS, QUANTIZED_OPS, STANDARD_DOMAINS, VALUE_CARRYING_OPS, WEIGHTED_LAYER_OPS
from ..ort_session import create_session, custom_op_fix  # a model over the protobuf limit: from a copy with external data
from ..quant.plan import build_plan
from ..quant.rules import RULES

log = logging.getLogger("converter")

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITIES = (ERROR, WARNING, INFO)

QDQ_MIN_OPSET = 10  # QuantizeLinear/DequantizeLinear exist from opset 10
HUGE_CONSTANT = 1e9  # |value| beyond this in the data path swamps an 8/16-bit range (attention masks: -3.4e38)


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning | info
    code: str  # stable identifier, e.g. "control-flow"
    node: str  # ONNX node name, PyTorch module path, or "" for the whole model
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class _Context:
    """What the checks read: the model as given, and a preprocessed copy with its plan."""

    original: onnx.ModelProto
    target: str
    path: Path | None = None
    prepared: onnx.ModelProto | None = None
    idx: GraphIndex | None = None
    plan: Any = None
    preprocess_error: str = ""
    missing_kernels: bool = False  # ONNX Runtime has no kernel for a custom-domain op (no library registered)


# --- checks ------------------------------------------------------------------------------------------

def _check_opset(ctx: _Context) -> Iterator[Finding]:
    opset = default_opset(ctx.original)
    if opset < QDQ_MIN_OPSET:
        yield Finding(ERROR, "opset-too-old", "",
                      f"the model uses opset {opset}; QuantizeLinear/DequantizeLinear need opset >= {QDQ_MIN_OPSET} "
                      f"(per-channel weights need {MIN_OPSET})",
                      "run `qconvert validate MODEL --upgrade-opset -o upgraded.onnx` (ONNX version converter) "
                      f"or re-export with opset_version={MIN_OPSET} or newer")
    elif opset < MIN_OPSET:
        yield Finding(INFO, "opset-per-channel", "",
                      f"the model uses opset {opset}; per-channel weight quantization needs opset {MIN_OPSET}: "
                      f"quantize upgrades it automatically",
                      f"nothing to do (or re-export with opset_version={MIN_OPSET} to skip the conversion)")
    if ctx.preprocess_error:
        yield Finding(ERROR, "preprocess-failed", "", ctx.preprocess_error,
                      "re-export the model with a recent opset (>= 13) and check it with onnx.checker")


def _check_node_names(ctx: _Context) -> Iterator[Finding]:
    g = ctx.original.graph
    missing = [i for i, n in enumerate(g.node) if not n.name]
    counts = Counter(n.name for n in g.node if n.name)
    dupes = sorted(name for name, c in counts.items() if c > 1)
    if missing:
        yield Finding(INFO, "unnamed-nodes", "",
                      f"{len(missing)} of {len(g.node)} nodes have no name; they are named <OpType>_<position> "
                      f"(e.g. {g.node[missing[0]].op_type}_{missing[0]}) before quantization",
                      "export with node names (torch.onnx.export names nodes by module) to get stable names "
                      "for --exclude-nodes and reports")
    for name in dupes[:20]:
        yield Finding(WARNING, "duplicate-node-name", name,
                      f"{counts[name]} nodes are named {name!r}; all but the first are renamed <OpType>_<position>",
                      "give every node a unique name so --exclude-nodes and reports can address it")


def _check_already_quantized(ctx: _Context) -> Iterator[Finding]:
    found = Counter(n.op_type for n in ctx.original.graph.node if n.op_type in QUANTIZED_OPS)
    if found:
        first = next(n.name for n in ctx.original.graph.node if n.op_type in QUANTIZED_OPS)
        yield Finding(ERROR, "already-quantized", first,
                      "the model is already quantized (" + ", ".join(f"{c} {op}" for op, c in found.most_common())
                      + "); quantizing it again would stack a second set of Q/DQ on integer data",
                      "quantize the float model it came from; to re-use its encodings, apply an encodings file "
                      "to the float model (qconvert apply-encodings)")


def _check_constant_weights(ctx: _Context) -> Iterator[Finding]:
    consts = [n for n in ctx.original.graph.node if n.op_type == "Constant"]
    float_big = [n for n in consts if _constant_size(n) >= 16]
    if float_big:
        yield Finding(INFO, "constant-node-weights", float_big[0].name or float_big[0].output[0],
                      f"{len(float_big)} tensors of 16+ values (weights) are Constant nodes, not initializers; "
                      "they are turned into initializers before planning so they are quantized like weights",
                      "nothing to do")


def _constant_size(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "value":
            return int(np.prod(a.t.dims)) if a.t.dims else 1
        if a.name in ("value_floats", "value_ints"):
            return len(a.floats) + len(a.ints)
    return 1


def _check_shared_weights(ctx: _Context) -> Iterator[Finding]:
    if ctx.idx is None:
        return
    for name in ctx.idx.initializers:
        users = [u for u in ctx.idx.uses(name) if (r := RULES.get(u.op_type)) is not None and r.weight is not None
                 and r.weight < len(u.input) and u.input[r.weight] == name]
        if len(users) > 1 and ctx.idx.is_float(name):
            yield Finding(WARNING, "shared-weight", users[0].name,
                          f"weight {name!r} is used by {len(users)} nodes ({', '.join(u.name for u in users[:4])}); "
                          "they share one encoding, and BatchNorm is not folded into a shared weight",
                          "export the layers with separate weights (or accept one shared encoding)")


def _check_dynamic_dims(ctx: _Context) -> Iterator[Finding]:
    inits = {t.name for t in ctx.original.graph.initializer}
    for vi in ctx.original.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        dynamic = [i for i, d in enumerate(dims) if not d.HasField("dim_value") or d.dim_value <= 0]
        shown = "[" + ", ".join(d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in dims) + "]"
        if dynamic and dynamic != [0]:
            yield Finding(WARNING, "dynamic-dims", vi.name,
                          f"input {vi.name!r} {shown} has dynamic dimensions {dynamic}: calibration samples "
                          "must cover the shapes used in deployment, and samples of different shapes cannot "
                          "share a batch",
                          "calibrate with realistic shapes (use --batch-size 1 when they vary), or export "
                          "with fixed shapes")
        elif dynamic:
            yield Finding(INFO, "dynamic-batch", vi.name, f"input {vi.name!r} {shown} has a dynamic batch dimension",
                          "nothing to do: calibration samples are batched along axis 0")


def _check_control_flow(ctx: _Context) -> Iterator[Finding]:
    for node, attr_name, sub in _subgraphs(ctx.original.graph):
        ops = Counter(n.op_type for n in _all_nodes(sub))
        weighted = sum(c for op, c in ops.items() if op in WEIGHTED_LAYER_OPS | HEAVY_OPS)
        yield Finding(INFO, "control-flow", f"{node.name or node.op_type}/{attr_name}",
                      f"{node.op_type} node {node.name!r} has subgraph {attr_name!r} ({sum(ops.values())} nodes, "
                      f"{weighted} Conv/Gemm/MatMul/recurrent); it is quantized with the main graph's rules, "
                      "except what the calibration data never reaches (a branch never taken stays in float)",
                      "calibrate with data that takes every branch you deploy; quantize_subgraphs: false keeps "
                      "bodies in float")


def _check_domains(ctx: _Context) -> Iterator[Finding]:
    custom = Counter((n.domain, n.op_type) for n in _all_nodes(ctx.original.graph) if n.domain not in STANDARD_DOMAINS)
    if ctx.missing_kernels:  # ONNX Runtime cannot run them at all: the ort-load error says so, and how to fix it
        return
    for (domain, op), count in sorted(custom.items()):
        first = next(n for n in _all_nodes(ctx.original.graph) if n.domain == domain and n.op_type == op)
        yield Finding(WARNING, "custom-domain", first.name,
                      f"{count} {domain}::{op} node(s): custom-domain ops have no quantization rule and stay in "
                      "float; the runtime must implement them",
                      "deploy with the same custom-op library, or export with standard ONNX ops (the rest of the "
                      "graph is quantized either way)")


def _check_rules(ctx: _Context) -> Iterator[Finding]:
    if ctx.plan is None:
        return
    no_rule = Counter(s.op_type for s in ctx.plan.nodes.values() if s.status == "float-no-rule")
    for op, count in sorted(no_rule.items()):
        first = next(n for n, s in ctx.plan.nodes.items() if s.op_type == op and s.status == "float-no-rule")
        heavy = op in HEAVY_OPS
        yield Finding(WARNING if heavy else INFO, "no-rule", first,
                      f"{count} {op} node(s) have no quantization rule and stay in float"
                      + (" although they carry weights" if heavy else ""),
                      "nothing to do" if not heavy else
                      f"re-export {op} as MatMul/Gemm ops (e.g. unrolled) to quantize its weights")
    quantized = sum(1 for t in ctx.plan.tensors.values())
    if not quantized and not ctx.preprocess_error:
        yield Finding(WARNING, "nothing-to-quantize", "",
                      f"no tensor of the top-level graph is quantized for target {ctx.target}: the quantized "
                      "model will be the float model",
                      "check the findings above (control flow, custom ops) and the --target")


def _check_patterns(ctx: _Context) -> Iterator[Finding]:
    """One finding per block kind recognised (graph.patterns / graph.math_blocks), naming where they are."""
    if ctx.plan is None:
        return
    kinds = Counter((p["kind"], p["qdq_inside"]) for p in ctx.plan.patterns)
    for (kind, inside), count in sorted(kinds.items()):
        found = [p for p in ctx.plan.patterns if p["kind"] == kind and p["qdq_inside"] == inside]
        first = found[0]
        how = "Q/DQ as for any op" if inside else "kept whole: no Q/DQ inside"
        where = "; ".join(f"{', '.join(p['inputs'])} -> {p['output']} ({len(p['nodes'])} nodes)" for p in found[:3])
        more = f"; +{len(found) - 3} more" if len(found) > 3 else ""
        yield Finding(INFO, "pattern", first["nodes"][0] if first["nodes"] else first["output"],
                      f"{count} {kind} block(s) recognised ({how} for target {ctx.target}): {where}{more}",
                      "nothing to do")


# Chains that look like a decomposed block (a start op, then one of the follow ops within a few steps): when no
# block matcher took them, the planner treats their ops one by one. (start ops, follow ops, what it looks like)
CHAIN_HINTS: tuple[tuple[frozenset[str], frozenset[str], str], ...] = (
    (frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"}),
     frozenset({"Sub", "Div", "Sqrt", "Reciprocal", "Pow"}), "a normalisation (LayerNorm/RMSNorm/L2)"),
    (frozenset({"Exp"}), frozenset({"ReduceSum", "Div"}), "a softmax"),
    (frozenset({"Erf", "Tanh", "Sigmoid", "Softplus", "HardSigmoid"}), frozenset({"Mul"}),
     "an activation (GELU/SiLU/Mish/HardSwish)"),
)
_CHAIN_STEPS = 3


def _check_unrecognised_chains(ctx: _Context) -> Iterator[Finding]:
    if ctx.plan is None or ctx.idx is None:
        return
    idx, plan = ctx.idx, ctx.plan
    claimed = {n for p in plan.patterns for n in p["nodes"]} | {n for n, s in plan.nodes.items() if s.pattern}
    for start_ops, follow_ops, looks in CHAIN_HINTS:
        chains = []
        for node in idx.graph.node:
            if node.op_type not in start_ops or node.name in claimed:
                continue
            chain, frontier = [node], [node]
            for _ in range(_CHAIN_STEPS):
                frontier = [u for n in frontier for t in n.output if t for u in idx.uses(t) if u.name not in claimed]
                hit = next((u for u in frontier if u.op_type in follow_ops), None)
                if hit is not None:
                    chain.append(hit)
                    break
            else:
                continue
            chains.append(chain)
        if not chains:
            continue
        quantized = [c for c in chains if any(plan.nodes.get(n.name) is not None and
                                              plan.nodes[n.name].status in ("quantized", "fused") for n in c)]
        shown = "; ".join(" -> ".join(f"{n.op_type} {n.name}" for n in c) for c in chains[:3])
        more = f"; +{len(chains) - 3} more" if len(chains) > 3 else ""
        yield Finding(WARNING if quantized else INFO, "unrecognised-chain", chains[0][0].name,
                      f"{len(chains)} chain(s) look like {looks} but match no block ({shown}{more}); "
                      + (f"{len(quantized)} get Q/DQ op by op" if quantized else "they run in float"),
                      "if it is one of the blocks converter/graph/math_blocks.py knows, its math differs (constants, "
                      "axes); else keep its ops in float with --exclude-nodes if accuracy drops" if quantized
                      else "nothing to do")


def _value_source(idx: GraphIndex, tensor: str, moves: frozenset[str]) -> str | None:
    """Op type that computed ``tensor``'s values, looking through data movement (``moves``)."""
    node = idx.producer.get(tensor)
    while node is not None and node.op_type in moves and node.input:
        node = idx.producer.get(node.input[0])
    return node.op_type if node is not None else None


def _check_mixed_concat(ctx: _Context) -> Iterator[Finding]:
    """A Concat of a bounded tensor (Sigmoid, Softmax) and an unbounded one would share one scale."""
    if ctx.plan is None or ctx.idx is None:
        return
    moves = frozenset(op for op, rule in RULES.items() if rule.kind == "shared" and op != "Concat")
    for node in ctx.idx.graph.node:
        status = ctx.plan.nodes.get(node.name)
        if node.op_type != "Concat" or status is None or status.status != "quantized":
            continue
        if not any(t in ctx.plan.tensors for t in node.input):
            continue
        sources = [_value_source(ctx.idx, t, moves) for t in node.input if t and not ctx.idx.is_constant(t)]
        bounded = sorted({s for s in sources if s in BOUNDED_OPS})
        if bounded and any(s not in BOUNDED_OPS for s in sources):
            yield Finding(WARNING, "mixed-range-concat", node.name,
                          f"Concat joins {', '.join(bounded)} output(s) (range ~0..1) with unbounded tensors "
                          f"({', '.join(sorted({s or 'input' for s in sources if s not in BOUNDED_OPS}))}): one "
                          "shared encoding would quantize the bounded values with the large tensors' step",
                          "nothing to do: quantize splits such scale groups after calibration when a member would "
                          "lose more than max_shared_scale_loss_bits (default 3); see the report's "
                          "summary.split_scale_groups")


def _check_huge_constants(ctx: _Context) -> Iterator[Finding]:
    """A huge constant (an attention mask of -3.4e38) reaching a quantized tensor swamps its range."""
    if ctx.plan is None or ctx.idx is None:
        return
    idx = ctx.idx
    reported: set[str] = set()
    for t in ctx.plan.tensors.values():
        if t.role != "activation":
            continue
        src = _huge_source(idx, t.name)
        if src and src not in reported:
            reported.add(src)
            yield Finding(WARNING, "huge-constant", idx.producer[t.name].name if t.name in idx.producer else t.name,
                          f"constant {src!r} holds values beyond {HUGE_CONSTANT:.0e} and reaches quantized tensor "
                          f"{t.name!r}: its encoding range would swamp every real value",
                          "clamp the constant at export (e.g. an attention mask of -1e4 instead of finfo.min), "
                          "or keep the consuming node float with --exclude-nodes")


def _huge_source(idx: GraphIndex, tensor: str, depth: int = 4) -> str | None:
    node = idx.producer.get(tensor)
    if node is None or depth == 0 or node.op_type not in VALUE_CARRYING_OPS:
        return None
    for name in node.input:
        value = idx.constant(name) if name else None
        if value is not None and np.issubdtype(value.dtype, np.floating) and value.size and \
                float(np.abs(value).max()) > HUGE_CONSTANT:
            return name
    for name in node.input:
        if name and not idx.is_constant(name) and idx.is_float(name):
            found = _huge_source(idx, name, depth - 1)
            if found:
                return found
    return None


def _check_size(ctx: _Context) -> Iterator[Finding]:
    size = proto_size(ctx.original)
    external = _external_tensors(ctx.path) if ctx.path else 0
    if is_large(ctx.original) or external:
        yield Finding(INFO, "external-data", "",
                      f"the model is {size / 2**30:.1f} GiB" + (f" with {external} tensors in external data files"
                                                                  if external else "")
                      + "; the quantized model is written with its weights in <name>.onnx.data beside it",
                      "nothing to do (keep the .data file next to the .onnx file)")


def _external_tensors(path: Path) -> int:
    try:
        light = onnx.load(str(path), load_external_data=False)
    except Exception:
        return 0
    return sum(1 for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)


def _check_runs(ctx: _Context) -> Iterator[Finding]:
    try:
        create_session(ctx.original, ["CPUExecutionProvider"], "off")
    except Exception as exc:
        first = str(exc).splitlines()[0]
        fix = custom_op_fix(first)
        ctx.missing_kernels = fix is not None
        yield Finding(ERROR, "ort-load", "", f"ONNX Runtime cannot load the float model: {first}",
                      fix or "calibration runs the float model in ONNX Runtime: fix or re-export the model first")


ONNX_CHECKS: tuple[Callable[[_Context], Iterator[Finding]], ...] = (
    _check_opset, _check_already_quantized, _check_runs, _check_node_names, _check_constant_weights,
    _check_shared_weights, _check_dynamic_dims, _check_control_flow, _check_domains, _check_rules,
    _check_huge_constants, _check_mixed_concat, _check_size, _check_patterns, _check_unrecognised_chains,
)


def ensure_float_model(model: onnx.ModelProto) -> None:
    """Raise the errors that make quantizing ``model`` meaningless (it is already quantized)."""
    for f in _check_already_quantized(_Context(model, "")):
        raise ModelError(f.message, f.fix)


def validate_onnx(model: str | Path | onnx.ModelProto, target: str = "ort-cpu") -> list[Finding]:
    """Every finding for ``model`` (a path or ModelProto; not modified), errors first."""
    original = load_model(model)
    ctx = _Context(original, target, Path(model) if isinstance(model, (str, Path)) else None)
    prepared = load_model(original)
    try:
        preprocess(prepared)
        ctx.prepared, ctx.idx = prepared, GraphIndex.build(prepared)
        ctx.plan = build_plan(prepared, QuantConfig(target=target), ctx.idx)
    except ModelError as exc:
        ctx.preprocess_error = exc.message
    findings = [f for check in ONNX_CHECKS for f in check(ctx)]
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


# --- reporting ----------------------------------------------------------------------------------------

def summarize(findings: list[Finding]) -> dict[str, int]:
    counts = Counter(f.severity for f in findings)
    return {"errors": counts[ERROR], "warnings": counts[WARNING], "info": counts[INFO]}


def format_table(findings: list[Finding], width: int = 100) -> str:
    """Findings as an aligned table, each fix on the line below its finding."""
    if not findings:
        return "no findings"
    node_w = min(40, max(4, *(len(f.node) for f in findings)))
    code_w = max(4, *(len(f.code) for f in findings))
    lines = [f"{'SEVERITY':8s}  {'CODE':{code_w}s}  {'NODE':{node_w}s}  MESSAGE"]
    for f in findings:
        node = f.node if len(f.node) <= node_w else "..." + f.node[-(node_w - 3):]
        lines.append(f"{f.severity.upper():8s}  {f.code:{code_w}s}  {node:{node_w}s}  {f.message}")
        if f.fix:
            lines.append(f"{'':8s}  {'':{code_w}s}  {'':{node_w}s}  fix: {f.fix}")
    return "\n".join(lines)


def report(findings: list[Finding], source: str, target: str) -> dict[str, Any]:
    s = summarize(findings)
    return {"model": source, "target": target, "passed": s["errors"] == 0, "summary": s,
            "findings": [f.to_dict() for f in findings]}
