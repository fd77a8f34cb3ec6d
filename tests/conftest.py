"""Shared fixtures: tiny graphs built with onnx.parser and the real models under models/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_models_module(name: str):
    """Import models/<name>.py (models/ is a folder of scripts, not a package)."""
    mod_name = f"_models_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, ROOT / "models" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def parse(text: str, **initializers: np.ndarray) -> onnx.ModelProto:
    """A model from onnx.parser text plus numpy initializers, checked."""
    model = onnx.parser.parse_model(text)
    for name, value in initializers.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The digits CNN trained on scikit-learn's real handwritten digits, exported to ONNX."""
    import torch

    from converter import export_torch

    mod = load_models_module("digits_cnn")
    model = mod.build()
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    export_torch(model, torch.zeros(1, 1, 8, 8), path)
    x_train, y_train, x_test, y_test = mod.load_split()
    return {"path": path, "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def float_of(result, model):
    """The float model ``result``'s encodings apply to: the ``<name>.prepared.onnx`` quantize wrote where a technique
    changed the float model (bias correction, on by default, corrects biases), else ``model``."""
    return result.report["outputs"].get("float_model") or model
