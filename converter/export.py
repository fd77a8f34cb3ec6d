"""PyTorch -> ONNX export (simplified, every node named after its module path).

The TorchScript exporter names nodes by module scope (``/layer1/layer1.0/conv1/Conv``), which
lets reports name the PyTorch module a node came from. onnxsim then folds constants (TF-style
"SAME" padding chains, shape arithmetic); BatchNorm is folded by the exporter in eval mode.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import onnx

from .errors import ModelError, UserError
from .graph.model_io import save_model
from .graph.passes import name_nodes

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


def export_torch(module: Any, example_inputs: Any, path: str | Path, input_names: list[str] | None = None,
                 output_names: list[str] | None = None, opset: int = 17, dynamic_batch: bool = True,
                 simplify: bool = True) -> onnx.ModelProto:
    """Export ``module`` to ONNX at ``path`` (atomically) and return the model."""
    import torch

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    input_names = input_names or (["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
    output_names = output_names or ["output"]
    dynamic_axes = {n: {0: "N"} for n in input_names + output_names} if dynamic_batch else None
    module = module.eval()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset,
                                  input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                                  do_constant_folding=True)
        except Exception as exc:
            raise ModelError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                             "check the example input shape (--input-shape) matches what the model expects") from None
        model = onnx.load(str(raw))
    if simplify:
        model = _simplify(model)
    name_nodes(model)
    save_model(model, path)
    log.info("exported %s to %s (%d nodes, opset %d)", type(module).__name__, path, len(model.graph.node), opset)
    return model


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
