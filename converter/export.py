"""PyTorch -> ONNX export (simplified, every node named after its module path).

Two exporters:

``dynamo`` (default)
    ``torch.onnx.export(..., dynamo=True)``: ``torch.export`` traces the module, the exporter
    PyTorch maintains (needs ``onnxscript``). Dynamic batch goes through ``dynamic_shapes``. Its
    nodes record the scopes of the modules they came from in ``metadata_props``
    (``pkg.torch.onnx.name_scopes``: ``['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d']``);
    :func:`name_from_scopes` renames them the TorchScript way. Its optimizer folds BatchNorm into
    the Conv before it (the fused node keeps the BatchNorm's scope; the Conv's weight names the
    module, so the node is named after the Conv).
``torchscript``
    the TorchScript-based exporter (deprecated by PyTorch), which names nodes by module scope
    itself (``/layer1/layer1.0/conv1/Conv``).

Both end in the same names, so reports and ``validate`` name the PyTorch module a node came from.
onnxsim then folds constants (TF-style "SAME" padding chains, shape arithmetic).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import onnx

from .errors import ModelError, OutputError, UserError
from .graph.model_io import save_model
from .graph.passes import name_nodes
from .options import check_name

log = logging.getLogger("converter")


def load_module_spec(spec: str) -> Callable[[], Any]:
    """``package.module:factory`` or ``path/to/file.py:factory`` -> the factory callable."""
    target, sep, attr_name = spec.rpartition(":")
    if not sep or not target or not attr_name:
        raise UserError(f"module spec {spec!r} is not of the form MODULE:FACTORY",
                        "write e.g. mypkg.nets:build or models/net.py:build")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UserError(f"file not found: {path}", "check the path before the ':'")
            mod_name = f"_converter_spec_{path.stem}"
            loader = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[mod_name] = module
            sys.path.insert(0, str(path.parent.resolve()))
            try:
                loader.loader.exec_module(module)
            finally:
                sys.path.pop(0)
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except ImportError as exc:
        raise UserError(f"cannot import {target!r}: {exc}",
                        _missing_package_fix(exc, "install the package that defines the model, or give a file path "
                                                  "(path/to/file.py:factory)")) from None
    except Exception as exc:  # the module itself fails on import: the user's code, not converter
        raise UserError(f"importing {target!r} failed: {type(exc).__name__}: {_first_line(exc)}",
                        f"fix the module (python -c \"import runpy; runpy.run_path('{target}')\" shows the traceback)"
                        if target.endswith(".py") else f"fix the module (python -c 'import {target}' shows the "
                                                       "traceback)") from None
    factory = getattr(module, attr_name, None)
    if not callable(factory):
        raise UserError(f"{target} has no callable {attr_name!r}", "name a function or class that builds the model")
    return factory


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _missing_package_fix(exc: ImportError, default: str) -> str:
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if not name:
        return default
    dist = name.replace("_", "-")
    return (f"install the missing package (pip install {dist}); the bundled example models need the test extras: "
            "pip install -e '.[dev]'")


def call_factory(spec: str, factory: Callable[[], Any]) -> Any:
    """Call a model factory; an exception inside it (a missing optional package, a bug) is a user error."""
    try:
        return factory()
    except ImportError as exc:
        raise UserError(f"{spec}: the factory needs a package that is not installed: {_first_line(exc)}",
                        _missing_package_fix(exc, "install the package the factory imports")) from None
    except Exception as exc:
        raise UserError(f"{spec}: the factory raised {type(exc).__name__}: {_first_line(exc)}",
                        "fix the factory (call it in Python to see the traceback)") from None


def build_module(spec: str):
    import torch

    log.info("building %s", spec)
    model = call_factory(spec, load_module_spec(spec))
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module",
                        "make the factory return the model instance")
    return model.eval()


EXPORTERS = ("dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest opset (onnxscript's torchlib is written for 18)
DEFAULT_OPSETS = {"dynamo": DYNAMO_MIN_OPSET, "torchscript": 17}  # what export_torch writes when opset is None
EXPORTED_MARK = "converter.exported_from"  # metadata_props key of a float model quantize exported from a module


def export_torch(module: Any, example_inputs: Any, path: str | Path, input_names: list[str] | None = None,
                 output_names: list[str] | None = None, opset: int | None = None, dynamic_batch: bool = True,
                 simplify: bool = True, exporter: str = "dynamo") -> onnx.ModelProto:
    """Export ``module`` to ONNX at ``path`` (atomically) and return the model.

    ``exporter``: ``"dynamo"`` (``torch.export``, default) or ``"torchscript"``. ``opset``: default
    :data:`DEFAULT_OPSETS` (18 for dynamo, 17 for torchscript); the dynamo exporter writes at least opset 18
    (:data:`DYNAMO_MIN_OPSET`)."""
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}", f"use one of: {', '.join(EXPORTERS)}")
    opset = DEFAULT_OPSETS[exporter] if opset is None else opset
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    input_names = input_names or (["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
    output_names = output_names or ["output"]
    module = module.eval()
    if exporter == "dynamo":
        opset = max(opset, DYNAMO_MIN_OPSET)
        model = _export_dynamo(module, args, input_names, output_names, opset, dynamic_batch)
    else:
        model = _export_torchscript(module, args, input_names, output_names, opset, dynamic_batch)
    if simplify:
        model = _simplify(model)
    name_nodes(model)
    save_model(model, path)
    log.info("exported %s to %s with the %s exporter (%d nodes, opset %d)", type(module).__name__, path, exporter,
             len(model.graph.node), opset)
    return model


def export_for_quantize(module: Any, example_inputs: Any, out_dir: Path, name: str | None) -> Path:
    """The float ONNX of a torch module given to ``quantize``, kept beside its outputs as ``<name>.onnx`` (the model
    the encodings and the QDQ model belong to; ``name`` defaults to the module's class name).

    A file already there is replaced only when an earlier export of this tool wrote it (:data:`EXPORTED_MARK` in
    its metadata); any other file of that name is never overwritten."""
    if example_inputs is None:
        raise UserError("quantizing a torch.nn.Module needs example_inputs",
                        "pass example_inputs=torch.randn(1, 3, 224, 224) (the model's input shape)")
    path = Path(out_dir) / f"{check_name(name or type(module).__name__)}.onnx"
    if path.exists():
        try:
            ours = any(p.key == EXPORTED_MARK for p in onnx.load(path, load_external_data=False).metadata_props)
        except Exception:
            ours = False
        if not ours:
            raise OutputError(f"{path} already exists and is no float model this tool exported (the float ONNX of "
                              "the module is written there)", "choose another output_dir or name, or move the file")
    model = export_torch(module, example_inputs, path)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        EXPORTED_MARK: type(module).__name__})
    save_model(model, path)
    log.info("float model of the %s module: %s", type(module).__name__, path)
    return path


def is_torch_module(model: Any) -> bool:
    torch = sys.modules.get("torch")  # a module can only exist where torch was imported
    return torch is not None and isinstance(model, torch.nn.Module)


def _export_torchscript(module: Any, args: tuple, input_names: list[str], output_names: list[str], opset: int,
                        dynamic_batch: bool) -> onnx.ModelProto:
    import torch

    dynamic_axes = {n: {0: "N"} for n in input_names + output_names} if dynamic_batch else None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset,
                                  input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                                  do_constant_folding=True)
        except Exception as exc:
            raise ModelError(f"the TorchScript exporter failed on {type(module).__name__}: {type(exc).__name__}: "
                             f"{_first_line(exc)}",
                             "check the example input shape (--input-shape) matches what the model expects, or "
                             "export with torch.export instead (--exporter dynamo)") from None
        return onnx.load(str(raw))


def _export_dynamo(module: Any, args: tuple, input_names: list[str], output_names: list[str], opset: int,
                   dynamic_batch: bool) -> onnx.ModelProto:
    import torch

    if importlib.util.find_spec("onnxscript") is None:
        raise UserError("the dynamo exporter (torch.export, the default) needs the onnxscript package",
                        "pip install onnxscript, or export with the TorchScript exporter (--exporter torchscript)")
    dynamic_shapes = tuple({0: torch.export.Dim("N")} for _ in args) if dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_torch_export(), \
                contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=True,
                                        verbose=False, report=False)
        model = program.model_proto
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:  # the exporter wraps torch.export's error ("step 1/3 ...")
            root = root.__cause__
        reason = re.sub(r"\x1b\[[0-9;]*m", "", _first_line(root))
        raise ModelError(f"torch.export failed on {type(module).__name__}: {type(root).__name__}: {reason}",
                         "check the example input shape (--input-shape) matches what the model expects; a forward "
                         "torch.export cannot trace (Python branches on tensor values; --static-batch if the batch "
                         "size is baked in) exports with the TorchScript exporter (--exporter torchscript)") from None
    name_from_scopes(model, {n for n, _ in module.named_modules() if n})
    return model


class _quiet_torch_export:
    """torch.export / the dynamo exporter log warnings (missing torchvision ops, progress) at import and export."""

    def __enter__(self):
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes", "onnx_ir",
                     "onnxscript"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)


SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_KEEP_METADATA = {SCOPES_KEY}  # the rest (stack traces, fx nodes with local paths) is dropped


def name_from_scopes(model: onnx.ModelProto, module_names: set[str]) -> int:
    """Name dynamo-exported nodes the TorchScript way, from the module scopes in their metadata.

    ``name_scopes`` ``['', 'features', 'features.0', 'conv2d']`` -> ``/features/features.0/Conv``:
    each segment is the module's name relative to the enclosing scope (a Sequential or ModuleList
    index keeps its parent's name: ``features.0``), the last is the ONNX op type, repeated names get
    ``_1``, ``_2``. A Conv/Gemm/MatMul that reads ``<module>.weight`` is named after that module
    (a Conv with a BatchNorm folded into it carries the BatchNorm's scope). Nodes without scopes
    keep their names. Returns the number of nodes renamed."""
    import ast

    inits = {t.name for t in model.graph.initializer}
    used: dict[str, int] = {}
    renamed = 0
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        keep = [p for p in node.metadata_props if p.key in _KEEP_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
        if SCOPES_KEY not in meta:
            continue
        try:
            scopes = [s for s in ast.literal_eval(meta[SCOPES_KEY]) if s in module_names]
        except (ValueError, SyntaxError):
            continue
        owner = next((i[: -len(".weight")] for i in node.input
                      if i in inits and i.endswith(".weight") and i[: -len(".weight")] in module_names), None)
        if owner is not None:
            scopes = [s for s in scopes if owner == s or owner.startswith(s + ".")]
            if not scopes or scopes[-1] != owner:
                scopes.append(owner)
        segments, parent = [], ""
        for s in scopes:
            rel = s[len(parent) + 1:] if parent and s.startswith(parent + ".") else s
            if rel.split(".")[0].isdigit() and parent:
                rel = f"{parent.rsplit('.', 1)[-1]}.{rel}"
            segments.append(rel)
            parent = s
        base = "/" + "/".join(segments + [node.op_type])
        k = used.get(base, 0)
        used[base] = k + 1
        node.name = base if k == 0 else f"{base}_{k}"
        renamed += 1
    return renamed


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:  # onnxsim cannot handle every graph; the raw export still works
        log.warning("onnxsim could not simplify the model (%s); keeping the raw export", exc)
        return model
    if not ok:
        log.warning("onnxsim's check of the simplified model failed; keeping the raw export")
        return model
    return simplified
