"""QuantConfig and the target presets.

A target preset is data: which integer types activations get, whether op outputs carry Q/DQ, which
activations fold into a preceding Conv/Gemm/MatMul, and which op types are quantized. Core code
never branches on a target's name.

Config files are YAML or JSON with the same keys as :class:`QuantConfig`; unknown keys and wrong
types are rejected with the key, the file and the line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    activation_signed: bool  # int8 (True) or uint8 (False) activations
    activation_symmetric: bool  # zero point 0 (TensorRT) or asymmetric range
    quantize_outputs: bool  # Q/DQ on op outputs (ORT fuses DQ->op->Q) or only on op inputs
    fusable_activations: frozenset[str]  # activations folded into Conv/Gemm/MatMul, no Q/DQ between
    op_types: frozenset[str] | None = None  # op types quantized; None means every op with a rule


TARGETS: dict[str, TargetPreset] = {
    "ort-cpu": TargetPreset(
        name="ort-cpu",
        description="ONNX Runtime CPU: uint8 asymmetric activations, int8 per-channel weights, "
        "Q/DQ around every quantized op so ORT fuses QLinearConv/QLinearMatMul/QGemm",
        activation_signed=False,
        activation_symmetric=False,
        quantize_outputs=True,
        fusable_activations=frozenset({"Relu", "Clip"}),
    ),
    "tensorrt": TargetPreset(
        name="tensorrt",
        description="TensorRT explicit quantization: int8 symmetric (zero point 0) everywhere, Q/DQ on "
        "the inputs of Conv/ConvTranspose/Gemm/MatMul, residual Adds and pooling, none on outputs",
        activation_signed=True,
        activation_symmetric=True,
        quantize_outputs=False,
        fusable_activations=frozenset(
            {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "PRelu"}
        ),
        op_types=frozenset(
            {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "AveragePool", "GlobalAveragePool", "MaxPool"}
        ),
    ),
    "qnn": TargetPreset(
        name="qnn",
        description="Qualcomm QNN / AIMET style: every activation quantized (uint8 or uint16 asymmetric), "
        "int8 per-channel weights",
        activation_signed=False,
        activation_symmetric=False,
        quantize_outputs=True,
        fusable_activations=frozenset({"Relu", "Clip"}),
    ),
}

CALIB_METHODS = ("minmax", "percentile")
ENCODINGS_VERSIONS = ("1.0.0", "0.6.1")
PROVIDERS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides how a model is quantized. Validated on construction."""

    target: str = "ort-cpu"
    calib_method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True
    activation_bits: int = 8
    weight_bits: int = 8
    max_samples: int | None = None
    batch_size: int = 16
    op_types: tuple[str, ...] | None = None  # overrides the target's op types
    exclude_nodes: tuple[str, ...] = ()  # node names kept in float
    providers: str = "auto"
    threads: int = 0  # ONNX Runtime intra-op threads; 0 lets ORT decide
    encodings_version: str = "1.0.0"

    def __post_init__(self) -> None:
        _check_choice("target", self.target, tuple(TARGETS))
        _check_choice("calib_method", self.calib_method, CALIB_METHODS)
        _check_choice("encodings_version", self.encodings_version, ENCODINGS_VERSIONS)
        _check_choice("providers", self.providers, PROVIDERS)
        _check_choice("activation_bits", self.activation_bits, (8, 16))
        _check_choice("weight_bits", self.weight_bits, (8,))
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}", "use e.g. 99.99")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples must be >= 1, got {self.max_samples}", "leave it unset to use all samples")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}", "use e.g. 16")
        if self.op_types is not None:
            object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))

    @property
    def preset(self) -> TargetPreset:
        return TARGETS[self.target]

    def quantized_op_types(self) -> frozenset[str] | None:
        return frozenset(self.op_types) if self.op_types is not None else self.preset.op_types

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["op_types"] = list(self.op_types) if self.op_types is not None else None
        d["exclude_nodes"] = list(self.exclude_nodes)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config>", lines: dict[str, int] | None = None) -> "QuantConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        lines = lines or {}
        for key, value in data.items():
            where = f"{source}" + (f", line {lines[key]}" if key in lines else "")
            if key not in fields:
                raise ConfigError(
                    f"unknown config key {key!r} in {where}",
                    f"remove it or use one of: {', '.join(sorted(fields))}",
                )
            _check_type(key, value, fields[key].type, where)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{exc.message} (in {source})", exc.fix) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "QuantConfig":
        data, lines = load_mapping(path)
        return cls.from_dict(data, str(path), lines)


def load_mapping(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML or JSON mapping; returns (data, {top-level key: line number})."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "check the path given to --config")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data, lines = json.loads(text), {}
        else:
            node = yaml.compose(text)
            data = yaml.safe_load(text)
            lines = {}
            if isinstance(node, yaml.MappingNode):
                lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}", "fix the YAML/JSON syntax at the position shown") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}",
                          "write one 'key: value' per line")
    return data, lines


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}",
                          f"set {key} to one of the listed values")


_TYPES = {"str": str, "bool": bool, "int": int, "float": (int, float)}


def _check_type(key: str, value: Any, annotation: str, where: str) -> None:
    ann = str(annotation)
    if value is None and "None" in ann:
        return
    if ann.startswith("tuple"):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        expected = "a list of strings"
    else:
        base = ann.split("|")[0].strip()
        typ = _TYPES.get(base, object)
        ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
        expected = {"str": "a string", "bool": "true or false", "int": "an integer", "float": "a number"}.get(base, base)
    if not ok:
        raise ConfigError(f"config key {key!r} in {where} must be {expected}, got {value!r}",
                          f"change {key} to {expected}")
