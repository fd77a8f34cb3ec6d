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
class PatternPolicy:
    """What Q/DQ one recognised op pattern (:mod:`converter.graph.patterns`) gets on a target.

    ``qdq_inside=False`` makes the pattern one unit: no Q/DQ on its internal tensors, its member
    nodes are not quantized one by one; its output is quantized like any op output (where the
    target quantizes outputs and a quantized node reads it). ``inputs`` says which of its inputs
    get a Q/DQ: ``"none"`` (a Q/DQ there only costs accuracy), ``"after-anchor"`` (an input that a
    quantized Conv/Gemm/MatMul group produces, so that op still runs on integers: QLinearConv needs
    a Q after it) or ``"all"`` (every activation quantized, QNN). ``join_anchor`` (residual Adds):
    the Add joins the fused group of the Conv/Gemm/MatMul producing its main input and only the
    shortcut input gets a Q/DQ.
    """

    qdq_inside: bool = True
    inputs: str = "none"  # none | after-anchor | all
    join_anchor: bool = False

    def __post_init__(self) -> None:
        if self.inputs not in ("none", "after-anchor", "all"):
            raise ValueError(f"PatternPolicy.inputs must be none, after-anchor or all; got {self.inputs!r}")


_ONE_UNIT = PatternPolicy(qdq_inside=False)
_EVERY_INPUT = PatternPolicy(qdq_inside=False, inputs="all")
# one unit whose input is quantized where a Conv/Gemm/MatMul group makes it (so that op still runs on integers)
_AFTER_ANCHOR = PatternPolicy(qdq_inside=False, inputs="after-anchor")

# Op types ONNX Runtime runs on integers (QLinear*/QGemm/MatMulIntegerToFloat) or moves as integers;
# anything else runs in float between a DQ and a Q, so quantizing it only costs accuracy.
_ORT_CPU_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Softmax", "MaxPool",
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather", "Pad", "Resize",
    "DepthToSpace", "SpaceToDepth", "Identity", "Expand", "Tile",
})


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    activation_signed: bool  # int8 (True) or uint8 (False) activations
    activation_symmetric: bool  # zero point 0 (TensorRT) or asymmetric range
    quantize_outputs: bool  # Q/DQ on op outputs (ORT fuses DQ->op->Q) or only on op inputs
    # activation kinds (op types, or SiLU/GELU/HardSwish composites) fused into the op before them
    fusable_activations: frozenset[str]
    op_types: frozenset[str] | None = None  # op types quantized; None means every op with a rule
    patterns: dict[str, PatternPolicy] = field(default_factory=dict)  # pattern kind -> policy (default: ops as usual)
    # compute ops whose input and output share one encoding (AIMET ties their quantizers, QNN requires it);
    # data-movement ops (rules.py "shared") always do
    tied_op_types: frozenset[str] = frozenset()
    # op types whose block-wise layers read their activations in float (weight-only): ONNX Runtime CPU fuses a blocked
    # DequantizeLinear -> MatMul into MatMulNBits (which quantizes its input per block itself) only when the MatMul's
    # other input is not dequantized and no QuantizeLinear follows it
    block_weight_only_ops: frozenset[str] = frozenset()
    # element-wise tails after the last compute layer on the way to a graph output run in float (plan.float_tail):
    # the target has no integer kernel that would read their Q/DQ, so quantizing them costs accuracy, buys nothing
    float_tail: bool = False


TARGETS: dict[str, TargetPreset] = {
    "ort-cpu": TargetPreset(
        name="ort-cpu",
        description="ONNX Runtime CPU: uint8 asymmetric activations, int8 per-channel weights, "
        "Q/DQ around every quantized op so ORT fuses QLinearConv/QLinearMatMul/QGemm; decomposed "
        "LayerNorm (with the residual Add before it)/GELU/HardSwish and attention scores stay whole "
        "(ORT fuses them at load time)",
        activation_signed=False,
        activation_symmetric=False,
        quantize_outputs=True,
        fusable_activations=frozenset({"Relu", "Clip"}),  # ORT drops Relu/Clip before a Q (Relu/ClipQuantFusion)
        op_types=_ORT_CPU_OPS,
        # a block is one unit where ORT fuses it at load time (LayerNorm, SkipLayerNorm, GELU) or where it holds
        # ops ORT runs only in float (HardSwish's Clip/Div, Mish's Softplus, the norms' Sqrt/Div/Reciprocal,
        # Softmax's Exp): a Q/DQ inside would break no integer chain, it only costs accuracy. Activations and
        # norms after a Conv/Gemm/MatMul keep a Q on their input so that op still becomes a QLinearConv/QGemm.
        # SiLU is recognised but NOT one unit: ORT runs x*sigmoid(x) as QLinearSigmoid + QLinearMul (each operand
        # its own scale), an unbroken integer chain between two QLinearConvs; as a float unit a YOLO-style SiLU
        # detector ran 1.19x FP32 at batch 1 (1.13x at 32) against 1.04x (0.93x) quantized, for the same class
        # scores (agreement 0.9997 vs 0.999; tools/blocks_bench.py)
        patterns={"LayerNorm": _ONE_UNIT, "SkipLayerNorm": _ONE_UNIT, "GELU": _ONE_UNIT, "attention": _ONE_UNIT,
                  "HardSwish": _AFTER_ANCHOR, "Mish": _AFTER_ANCHOR, "RMSNorm": _AFTER_ANCHOR,
                  "L2Norm": _AFTER_ANCHOR, "DecomposedSoftmax": _AFTER_ANCHOR},
        block_weight_only_ops=frozenset({"MatMul"}),
        float_tail=True,
    ),
    "tensorrt": TargetPreset(
        name="tensorrt",
        description="TensorRT explicit quantization: int8 symmetric (zero point 0) everywhere, Q/DQ on "
        "the inputs of Conv/ConvTranspose/Gemm/MatMul, on the shortcut input of residual Adds (the Add "
        "fuses into the Conv) and on pooling, none on outputs",
        activation_signed=True,
        activation_symmetric=True,
        quantize_outputs=False,
        fusable_activations=frozenset(
            {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "PRelu", "SiLU", "GELU",
             "Elu", "Selu", "Softplus", "Mish"}
        ),
        op_types=frozenset(
            {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "AveragePool", "GlobalAveragePool", "MaxPool"}
        ),
        # TensorRT's Myelin fuses normalisations and pointwise chains whole (its Q/DQ placement guide: quantize
        # the inputs of the compute ops only)
        patterns={"residual_add": PatternPolicy(join_anchor=True), "LayerNorm": _ONE_UNIT,
                  "SkipLayerNorm": _ONE_UNIT, "GELU": _ONE_UNIT, "SiLU": _ONE_UNIT, "HardSwish": _ONE_UNIT,
                  "Mish": _ONE_UNIT, "RMSNorm": _ONE_UNIT, "L2Norm": _ONE_UNIT, "DecomposedSoftmax": _ONE_UNIT,
                  "attention": _ONE_UNIT},
    ),
    "qnn": TargetPreset(
        name="qnn",
        description="Qualcomm QNN / AIMET style: every activation quantized (uint8 or uint16 asymmetric), "
        "int8 per-channel weights, AIMET supergroups (Conv/Gemm + Relu/Clip/PRelu, Add + Relu); decomposed "
        "LayerNorm/GELU stay whole (the QNN converter maps them to LayerNorm/Gelu ops)",
        activation_signed=False,
        activation_symmetric=False,
        quantize_outputs=True,
        fusable_activations=frozenset({"Relu", "Clip", "PRelu"}),
        # attention scores (+ the additive mask, often float32's lowest value: quantizing it leaves the scores
        # no resolution) stay whole: QNN runs masked softmax in higher precision
        # QNN has LayerNorm, RmsNorm, L2Norm, Gelu, HardSwish and Softmax ops: their decomposed forms map to one op
        # that reads quantized inputs; SiLU and Mish stay op by op (QNN runs Sigmoid/Tanh/Mul on integers)
        patterns={"LayerNorm": _EVERY_INPUT, "GELU": _EVERY_INPUT, "RMSNorm": _EVERY_INPUT, "L2Norm": _EVERY_INPUT,
                  "DecomposedSoftmax": _EVERY_INPUT, "attention": _ONE_UNIT},
        # aimet_onnx op_types_to_tie_qtzrs (converter/quant/aimet_rules.py TIED_OP_TYPES); Concat and Resize are
        # data movement and tied anyway; a Relu's input has no encoding of its own here (fused into the op before
        # it; where AIMET's supergroups do not fuse, the file gives the input the Relu's encoding: its tie)
        tied_op_types=frozenset({"AveragePool"}),
    ),
}

CALIB_METHODS = ("minmax", "minmax_ema", "percentile", "entropy", "mse")
WEIGHT_CALIB_METHODS = ("minmax", "mse")
ENCODINGS_VERSIONS = ("1.0.0", "0.6.1", "2.0.0")
PROVIDERS = ("auto", "cpu", "cuda")
CLE_RELU6_MODES = ("keep", "min", "replace")
WEIGHT_BITS = (4, 8)
WEIGHT_BLOCK_SIZES = (32, 64, 128)
# weight_bits_overrides keys besides node names and "op:<OpType>": the first / last layer with a weight, and every
# depthwise Conv (one input channel per group: a few weights per channel, where 4 bits hurt most)
LAYER_POSITIONS = ("first", "last", "depthwise")
BIAS_CORRECTION_MODES = ("empirical", "analytical", "auto")


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides how a model is quantized. Validated on construction."""

    target: str = "ort-cpu"
    calib_method: str = "minmax"
    weight_calib: str = "minmax"  # weights: minmax (max |w| per channel) or mse (clipping that minimises MSE)
    # weights symmetric (signed, zero point 0) or asymmetric (unsigned, a zero point per channel: skewed channels
    # use every level; targets whose kernels need zero-point-free weights reject it)
    weight_symmetric: bool = True
    percentile: float = 99.999
    per_channel: bool = True
    activation_bits: int = 8
    weight_bits: int = 8  # 8, or 4: int4 weights (packed, opset 21 DequantizeLinear), per channel or per tensor
    # block-wise weights (opset 21 blocked DequantizeLinear): one scale per block of this many input channels and
    # output channel, for MatMul (2-D weights), Gemm and Conv; None: per channel (converter.quant.plan)
    weight_block_size: int | None = None
    # per-layer weight widths: {node name | "op:<OpType>" | "first" | "last": 4 | 8}; a node name wins over
    # first/last, which win over op:, which wins over weight_bits ("first: 8, last: 8" keeps both ends at 8 bits)
    weight_bits_overrides: dict[str, int] = field(default_factory=dict)
    max_samples: int | None = None
    batch_size: int = 16
    op_types: tuple[str, ...] | None = None  # overrides the target's op types
    exclude_nodes: tuple[str, ...] = ()  # node names kept in float
    int16_nodes: tuple[str, ...] = ()  # node names whose activations (inputs, output) use 16 bits
    # nodes kept in float that also read their inputs in float where no quantized op reads them (the accuracy
    # search's float layers: its ranking measures exactly that); unlike exclude_nodes, a Conv/Gemm/MatMul producer
    # of such an input then loses its output Q and runs in float too, and the report counts it (ort_cpu_kernels)
    exclude_with_inputs: tuple[str, ...] = ()
    providers: str = "auto"
    threads: int = 0  # ONNX Runtime intra-op threads; 0 lets ORT decide
    encodings_version: str = "1.0.0"
    # write every quantized tensor (int32 biases, data-movement outputs) into 1.0.0/0.6.1 files; by default they
    # name only what AIMET quantizes, so its strict load accepts them (converter/quant/aimet_rules.py)
    encodings_all_tensors: bool = False
    # calibration: per-tensor methods ({tensor name | "op:<OpType>": method}), EMA momentum of minmax_ema,
    # histogram bins covering [0, max|x|], histogram values per sample and tensor (0: all), memory bound
    calib_overrides: dict[str, str] = field(default_factory=dict)
    ema_momentum: float = 0.01
    histogram_bins: int = 2048
    histogram_subsample: int = 16384
    calib_memory_budget_mb: int = 1024
    # a scale group (Concat inputs and output) is split when sharing one encoding would cost a member more
    # than this many bits of resolution (see converter.quant.scale_groups); None keeps every group whole
    max_shared_scale_loss_bits: float | None = 3.0
    # SmoothQuant on MatMul/Gemm inputs with outlier channels (applied only where it lowers the quantized layers'
    # error >= 1.5x), folded into the producer where it can be, else a float Mul; alpha "auto" (or None) picks it
    # per tensor by that error
    smoothquant: bool = True
    smoothquant_alpha: float | str | None = 0.5
    # quantize inside If/Loop/Scan bodies (converter.quant.control_flow); off: bodies stay in float
    quantize_subgraphs: bool = True
    # cross-layer equalization + high-bias absorption on the float model (converter.quant.cle); ReLU6 (Clip(0, 6))
    # between two equalized layers: "keep" (skip the pair), "min" (Relu + Min by the per-channel bound 6/s: FP32
    # unchanged, but ORT then runs the Conv before the Min in float) or "replace" it by Relu (AIMET's; FP32 changes)
    cle: bool = False
    cle_relu6: str = "keep"
    # bias correction: each quantized Conv/Gemm's bias shifted so its mean output matches the float model's
    # (converter.quant.bias_correction): "empirical" measures on calibration data; "analytical" computes the
    # weights' share from the BatchNorm statistics the layer's input comes from (layers without: untouched);
    # "auto" is analytical where those statistics reach and empirical elsewhere (AIMET's split)
    bias_correction: bool = False
    bias_correction_mode: str = "empirical"
    # the default's cheap bias correction (converter.techniques.fast_bias_correction): depthwise Convs only, one
    # measurement on 16 calibration samples; off where bias_correction (the full one) runs
    fast_bias_correction: bool = True
    # AdaRound: each Conv/ConvTranspose/Gemm/MatMul's weights rounded up or down to reconstruct its output on
    # calibration data (converter.quant.adaround), this many Adam steps per layer (AIMET's default: 10000; 0: none,
    # the local search alone); adaround_search: then a greedy local search on the layer's quadratic loss from the
    # better of nearest and AdaRound (the lowest loss of the three is kept)
    adaround: bool = False
    adaround_iterations: int = 1000
    adaround_search: bool = True
    # issue 26: weight_algo -- how MatMul/Gemm weights are put on their grid: rtn (nearest rounding), gptq
    # (converter.quant.gptq: column by column against the layer's input Hessian, calibration data) or hqq
    # (converter.quant.hqq: each block's scale and zero point fitted, no data; asymmetric, ort-cpu only)
    weight_algo: str = "rtn"
    # weights alone quantized, every activation left in float (what ONNX Runtime's MatMulNBitsQuantizer makes): with
    # block-wise MatMul weights on ort-cpu every weight MatMul then runs as MatMulNBits and nothing else is quantized
    weight_only: bool = False
    # shared libraries with ONNX Runtime custom-op kernels, registered in every session (--custom-op-library;
    # converter.ort_session.use_custom_op_libraries)
    custom_op_libraries: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("target", self.target, tuple(TARGETS))
        _check_choice("calib_method", self.calib_method, CALIB_METHODS)
        _check_choice("weight_calib", self.weight_calib, WEIGHT_CALIB_METHODS)
        _check_choice("encodings_version", self.encodings_version, ENCODINGS_VERSIONS)
        _check_choice("providers", self.providers, PROVIDERS)
        _check_choice("activation_bits", self.activation_bits, (8, 16))
        _check_choice("cle_relu6", self.cle_relu6, CLE_RELU6_MODES)
        _check_choice("bias_correction_mode", self.bias_correction_mode, BIAS_CORRECTION_MODES)
        _check_weights(self)
        _check_weight_algo(self)
        if self.adaround_iterations < 0 or (self.adaround_iterations == 0 and not self.adaround_search):
            raise ConfigError(f"adaround_iterations must be >= 1 (or 0 with adaround_search: the search alone), got "
                              f"{self.adaround_iterations}{'' if self.adaround_search else ' with adaround_search off'}",
                              "use e.g. 1000 (AIMET's default is 10000; more is slower and rarely much better)")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}", "use e.g. 99.99")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"max_samples must be >= 1, got {self.max_samples}", "leave it unset to use all samples")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}", "use e.g. 16")
        _check_calibration(self)
        if self.op_types is not None:
            object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))
        object.__setattr__(self, "int16_nodes", tuple(self.int16_nodes))
        object.__setattr__(self, "exclude_with_inputs", tuple(self.exclude_with_inputs))
        libs = self.custom_op_libraries
        object.__setattr__(self, "custom_op_libraries", (libs,) if isinstance(libs, (str, Path)) else tuple(libs))

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
        d["int16_nodes"] = list(self.int16_nodes)
        d["exclude_with_inputs"] = list(self.exclude_with_inputs)
        d["custom_op_libraries"] = [str(p) for p in self.custom_op_libraries]
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


def load_mapping(path: str | Path, what: str = "config file", option: str = "--config"
                 ) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML or JSON mapping; returns (data, {top-level key: line number}). ``what`` and ``option`` name the
    file and the option (or argument) that gave it, in the error of a missing file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}", f"check the path given to {option}")
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


WEIGHT_ALGOS = ("rtn", "gptq", "hqq")  # issue 26: weight_algo


def _check_weight_algo(c: "QuantConfig") -> None:  # issue 26: weight_algo
    _check_choice("weight_algo", c.weight_algo, WEIGHT_ALGOS)
    if c.weight_algo == "hqq" and c.target != "ort-cpu":
        raise ConfigError(f"weight_algo hqq learns a zero point per weight block, which target {c.target!r} cannot "
                          "take (its integer kernels want zero-point-free weights)",
                          "use --weight-algo gptq (symmetric grids), or --target ort-cpu")
    if c.weight_algo != "rtn" and c.adaround:
        raise ConfigError(f"weight_algo {c.weight_algo} and adaround both choose the rounding of MatMul/Gemm weights",
                          "use one of them: drop --adaround, or use --weight-algo rtn")


def _check_weights(c: "QuantConfig") -> None:
    if c.weight_bits not in WEIGHT_BITS:
        raise ConfigError(f"weight_bits must be 4 or 8; got {c.weight_bits!r}",
                          "use 8 (int8) or 4 (int4 per channel, ONNX opset 21); other widths have no ONNX type "
                          "ONNX Runtime runs")
    for key, bits in dict(c.weight_bits_overrides).items():
        if not isinstance(key, str) or not key or key == "op:":
            raise ConfigError(f"weight_bits_overrides keys must be node names, 'op:<OpType>', 'first', 'last' or "
                              f"'depthwise'; "
                              f"got {key!r}", "e.g. weight_bits_overrides: {first: 8, last: 8, 'op:Gemm': 8}")
        if bits not in WEIGHT_BITS or isinstance(bits, bool):
            raise ConfigError(f"weight_bits_overrides[{key!r}] must be 4 or 8; got {bits!r}",
                              "use 8 (int8) or 4 (int4); other widths have no ONNX type ONNX Runtime runs")
    object.__setattr__(c, "weight_bits_overrides", dict(c.weight_bits_overrides))
    if not c.weight_symmetric and c.target != "ort-cpu":
        raise ConfigError(f"asymmetric weights (weight_symmetric: false) on target {c.target!r}: its integer "
                          "kernels take weights with zero point 0 only", "use --target ort-cpu, or drop "
                          "--no-weight-symmetric")
    if c.weight_block_size is None:
        return
    if c.weight_block_size not in WEIGHT_BLOCK_SIZES or isinstance(c.weight_block_size, bool):
        raise ConfigError(f"weight_block_size must be one of {', '.join(map(str, WEIGHT_BLOCK_SIZES))}; got "
                          f"{c.weight_block_size!r}", "use 32, 64 or 128 (powers of two ONNX Runtime's MatMulNBits "
                          "runs), or leave it unset for per-channel weights")
    if not c.per_channel:
        raise ConfigError("weight_block_size needs per-channel weights: blocks split each output channel's scale, "
                          "a per-tensor weight has one scale", "drop --per-tensor (per_channel: false), or drop "
                          "--weight-block-size")
    if c.encodings_version == "0.6.1":
        raise ConfigError("encodings version 0.6.1 has no block-wise form (one entry per channel, no block size)",
                          "use --encodings-version 2.0.0 (or 1.0.0: enc_type PER_BLOCK), or drop --weight-block-size")


def _check_calibration(c: "QuantConfig") -> None:
    for key, method in dict(c.calib_overrides).items():
        if not isinstance(key, str) or not key or key == "op:":
            raise ConfigError(f"calib_overrides keys must be tensor names or 'op:<OpType>', got {key!r}",
                              "e.g. calib_overrides: {'op:Softmax': minmax, 'conv1_out': entropy}")
        _check_choice(f"calib_overrides[{key!r}]", method, CALIB_METHODS)
    object.__setattr__(c, "calib_overrides", dict(c.calib_overrides))
    if not 0.0 < c.ema_momentum <= 1.0:
        raise ConfigError(f"ema_momentum must be in (0, 1], got {c.ema_momentum}", "use e.g. 0.01")
    if not 128 <= c.histogram_bins <= 65536 or c.histogram_bins & (c.histogram_bins - 1):
        raise ConfigError(f"histogram_bins must be a power of two in [128, 65536], got {c.histogram_bins}",
                          "use 2048 (TensorRT's choice)")
    if c.histogram_subsample < 0:
        raise ConfigError(f"histogram_subsample must be >= 0, got {c.histogram_subsample}",
                          "use 0 to histogram every value, or e.g. 16384")
    if c.max_shared_scale_loss_bits is not None and c.max_shared_scale_loss_bits < 0:
        raise ConfigError(f"max_shared_scale_loss_bits must be >= 0, got {c.max_shared_scale_loss_bits}",
                          "use e.g. 3 (bits), or null to never split a scale group")
    if isinstance(c.smoothquant_alpha, str) and c.smoothquant_alpha != "auto" or \
            isinstance(c.smoothquant_alpha, (int, float)) and not 0.0 < c.smoothquant_alpha < 1.0:
        raise ConfigError(f"smoothquant_alpha must be in (0, 1) or 'auto', got {c.smoothquant_alpha!r}",
                          "use e.g. 0.5, or auto to pick alpha per tensor")
    if c.calib_memory_budget_mb < 1:
        raise ConfigError(f"calib_memory_budget_mb must be >= 1, got {c.calib_memory_budget_mb}", "use e.g. 1024")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}",
                          f"set {key} to one of the listed values")


_TYPES = {"str": str, "bool": bool, "int": int, "float": (int, float)}


def _check_type(key: str, value: Any, annotation: str, where: str) -> None:
    ann = str(annotation)
    if value is None and "None" in ann:
        return
    if ann.startswith("dict[str, int]"):
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                             for k, v in value.items())
        expected = "a mapping of strings to integers"
    elif ann.startswith("dict"):
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        expected = "a mapping of strings to strings"
    elif ann.startswith("tuple"):
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
