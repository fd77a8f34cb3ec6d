"""PyTorch-side model validation (AIMET ModelValidator style), then the ONNX checks on the export.

Two things a module-based quantization flow (AIMET QuantSim, per-module settings, exclusions by
module name, encodings mapped back to modules) cannot handle, each reported with the module path:

reused modules (error)
    one module instance called more than once in ``forward`` (``self.relu1`` applied after two
    convolutions). Its calls see different tensors but share one module, so they share one set of
    quantizers and cannot be told apart; in the ONNX export they become ``/relu1/Relu`` and
    ``/relu1_1/Relu``. Found with forward hooks counting calls of every leaf module in one forward.
ops with no module
    functional calls: ``F.linear(x, self.weight)`` / ``torch.matmul(x, self.w)`` on parameters
    (error: a weighted layer no module owns) and ``F.relu`` / ``torch.sigmoid`` ... (warning).
    Found in a ``torch.fx`` trace (``call_function``/``call_method`` nodes; ``get_attr`` operands
    are parameters). Where fx cannot trace the model (data-dependent control flow), the ONNX
    export's scope names are used instead: a weighted node whose scope is not a leaf module came
    from a functional call.

:func:`onnx_module_map` maps every ONNX node of an export back to the module path it came from
(``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1``); the ONNX findings on the export name the
module next to the node.
"""

from __future__ import annotations

import logging
import operator
import re
import tempfile
from pathlib import Path
from typing import Any

import onnx

from ..errors import UserError
from ..export import export_torch
from ..ops import WEIGHTED_LAYER_OPS
from .onnx_checks import ERROR, INFO, SEVERITIES, WARNING, Finding, validate_onnx

log = logging.getLogger("converter")

# functional call -> (kind, the module to use instead). "weighted": a finding when an operand is a parameter.
_WEIGHTED = {"linear": "nn.Linear", "conv1d": "nn.Conv1d", "conv2d": "nn.Conv2d", "conv3d": "nn.Conv3d",
             "conv_transpose1d": "nn.ConvTranspose1d", "conv_transpose2d": "nn.ConvTranspose2d",
             "conv_transpose3d": "nn.ConvTranspose3d", "matmul": "nn.Linear", "mm": "nn.Linear", "bmm": "nn.Linear",
             "addmm": "nn.Linear", "einsum": "nn.Linear", "embedding": "nn.Embedding", "layer_norm": "nn.LayerNorm",
             "batch_norm": "nn.BatchNorm2d", "prelu": "nn.PReLU"}
_ACTIVATIONS = {"relu": "nn.ReLU", "relu_": "nn.ReLU", "relu6": "nn.ReLU6", "gelu": "nn.GELU", "silu": "nn.SiLU",
                "sigmoid": "nn.Sigmoid", "tanh": "nn.Tanh", "hardswish": "nn.Hardswish",
                "hardsigmoid": "nn.Hardsigmoid", "leaky_relu": "nn.LeakyReLU", "elu": "nn.ELU", "softmax": "nn.Softmax",
                "log_softmax": "nn.LogSoftmax", "mish": "nn.Mish", "softplus": "nn.Softplus"}
TOP = "<top level>"  # the module passed in, as a finding's node


def validate_torch(module: Any, example_inputs: Any, target: str = "ort-cpu", onnx_checks: bool = True) -> list[Finding]:
    """Findings for a ``torch.nn.Module``: reused modules, functional ops, then the ONNX checks of its export."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    module = module.eval()
    findings = reused_modules(module, args)
    functional, traced = functional_ops(module)
    findings += functional
    if onnx_checks or not traced:
        model = _export(module, args)
        if model is not None:
            mapping = onnx_module_map(model, module)
            if not traced:
                findings += _functional_from_scopes(model, module, mapping)
            if onnx_checks:
                findings += [_with_module(f, mapping) for f in validate_onnx(model, target)]
        else:
            findings.append(Finding(WARNING, "export-failed", "", "torch.onnx.export failed: only the PyTorch checks ran",
                                    "check the example input shape (--input-shape) and that the model exports"))
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


# --- reused modules ----------------------------------------------------------------------------------

def reused_modules(module: Any, args: tuple) -> list[Finding]:
    """Leaf modules called more than once in one forward pass."""
    import torch

    calls: dict[str, int] = {}
    handles = []
    for name, sub in module.named_modules():
        if name and not any(True for _ in sub.children()):
            handles.append(sub.register_forward_hook(_counter(calls, name)))
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, count in calls.items():
        if count > 1:
            kind = type(module.get_submodule(name)).__name__
            out.append(Finding(ERROR, "reused-module", name,
                               f"module {name!r} ({kind}) is called {count} times in forward: its calls share one "
                               "set of quantizers (one encoding for different tensors) and cannot be excluded or "
                               f"reported one by one (the ONNX export names them {name}, {name}_1, ...)",
                               f"create one {kind} per call site (e.g. self.{name.split('.')[-1]}_2 = nn.{kind}(...)) "
                               "and call each once"))
    return out


def _counter(calls: dict[str, int], name: str):
    def hook(mod, inputs, output):
        calls[name] = calls.get(name, 0) + 1
    return hook


# --- functional ops ----------------------------------------------------------------------------------

def functional_ops(module: Any) -> tuple[list[Finding], bool]:
    """Functional calls found by torch.fx; (findings, whether fx could trace the model)."""
    import torch.fx

    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception as exc:  # data-dependent control flow, unsupported Python: use the export instead
        log.info("torch.fx cannot trace %s (%s): functional ops are found from the ONNX export's scopes",
                 type(module).__name__, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return [], False
    out = []
    for node in traced.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        fname = _function_name(node.target)
        owner = _owner(node)
        params = [a.target for a in _flat_args(node) if getattr(a, "op", None) == "get_attr"]
        where = owner or TOP
        if fname in _WEIGHTED and params:
            out.append(Finding(ERROR, "functional-weighted-op", where,
                               f"{fname}() in the forward of {where!r} uses parameter(s) {', '.join(params)} with no "
                               f"{_WEIGHTED[fname]} module: no module owns this layer, so it cannot be excluded, "
                               "configured or mapped to an encoding by module name (AIMET QuantSim cannot wrap it)",
                               f"replace the call by a {_WEIGHTED[fname]} submodule holding the parameter"))
        elif fname in _ACTIVATIONS:
            out.append(Finding(WARNING, "functional-op", where,
                               f"{fname}() is called as a function in the forward of {where!r} (fx node "
                               f"{node.name!r}): no module owns its output quantizer, so it cannot be configured "
                               "or excluded by module name",
                               f"use a {_ACTIVATIONS[fname]} submodule instead of the functional call"))
    return out, True


def _function_name(target: Any) -> str:
    if isinstance(target, str):  # call_method: x.relu()
        return target
    if target is operator.matmul:
        return "matmul"
    return getattr(target, "__name__", str(target))


def _owner(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"@\d+$", "", path)


def _flat_args(node) -> list:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


# --- ONNX export and module mapping ------------------------------------------------------------------

def _export(module: Any, args: tuple) -> onnx.ModelProto | None:
    with tempfile.TemporaryDirectory() as tmp:
        # raw export (no onnxsim): every node keeps the scope of the module that produced it. torch.export
        # first (the default exporter); a model it cannot trace (data-dependent control flow) goes
        # through the TorchScript exporter, which records the path the example input takes.
        for exporter in ("dynamo", "torchscript"):
            try:
                return export_torch(module, args, Path(tmp) / "model.onnx", simplify=False, exporter=exporter)
            except UserError as exc:
                log.warning("%s", exc.message)
        return None


def onnx_module_map(model: onnx.ModelProto, module: Any | None = None) -> dict[str, str]:
    """ONNX node name -> path of the module it came from ("" for the top-level module's own ops).

    The TorchScript exporter names nodes ``/<scope>/<scope>/<OpType>[_n]``. A scope segment is a
    module name relative to an enclosing module (``/features/features.0/Conv`` for the first layer
    of a Sequential, ``/encoder/layer.0/...`` for a ModuleList that is never called itself), and a
    module called twice gets ``<name>_1`` for its second call. With ``module`` given, each segment
    is resolved against the module tree (deepest enclosing path first, call suffix dropped).
    """
    names = {n for n, _ in module.named_modules()} if module is not None else None
    out = {}
    for node in model.graph.node:
        if node.name.startswith("/"):
            out[node.name] = _resolve(node.name.split("/")[1:-1], names)
    return out


def _resolve(segments: list[str], names: set[str] | None) -> str:
    path: list[str] = []
    for seg in segments:
        if names is None:
            path = _join_guess(path, seg)
            continue
        for candidate in (seg, re.sub(r"_\d+$", "", seg)):
            found = next((p for k in range(len(path), -1, -1)
                          if (p := ".".join(path[:k] + [candidate])) in names), None)
            if found is not None:
                path = found.split(".")
                break
        else:
            path = _join_guess(path, seg)
    return ".".join(path)


def _join_guess(path: list[str], seg: str) -> list[str]:
    head = seg.split(".")[0]
    if path and path[-1] == head:  # features + features.0 -> features.0
        return path[:-1] + seg.split(".")
    return path + seg.split(".")


def _functional_from_scopes(model: onnx.ModelProto, module: Any, mapping: dict[str, str]) -> list[Finding]:
    leaves = {n for n, m in module.named_modules() if n and not any(True for _ in m.children())}
    inits = {t.name for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        path = mapping.get(node.name)
        if path is None or path in leaves or node.op_type not in WEIGHTED_LAYER_OPS:
            continue
        if any(i in inits for i in node.input):
            where = path or TOP
            out.append(Finding(ERROR, "functional-weighted-op", f"{where} ({node.name})",
                               f"ONNX {node.op_type} node {node.name!r} comes from a functional call in the forward of "
                               f"{where!r} (not from a leaf module) and reads a parameter",
                               "replace the call by a module (nn.Linear / nn.Conv2d) holding the parameter"))
    return out


def _with_module(f: Finding, mapping: dict[str, str]) -> Finding:
    path = mapping.get(f.node)
    if not path:
        return f
    return Finding(f.severity, f.code, f"{path} ({f.node})", f.message, f.fix)


__all__ = ["validate_torch", "reused_modules", "functional_ops", "onnx_module_map", "Finding", "ERROR", "WARNING",
           "INFO"]
