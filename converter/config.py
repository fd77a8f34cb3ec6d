"""QuantConfig and the target presets.

A target preset is data: which integer types activations get, whether op outputs carry Q/DQ, which
activations fold into a preceding Conv/Gemm/MatMul, and which op types are quantized. Core code
never branches on a target's name.

Config files are YAML or JSON, written in sections (``weights: {bits: 4}``; the layout and how to add an
option: :class:`QuantConfig`'s docstring) or with the flat keys of :class:`QuantConfig` (the alias table
:data:`ALIASES` maps each to its section path); a ``search:`` section (:class:`SearchConfig`) runs the accuracy
search. One validator (:meth:`QuantConfig.from_mappings`) serves config files, job files and the command line's
config; unknown keys and wrong types are rejected with the key, the file and the line.

Issue 26 helpers' flat fields (adaquant, block_reconstruction, weight_algo, calib_method auto, device) move into
sections as one line each: give the field ``option(default, "section.key", "--flag", help=..., type=...)``
(techniques: ``techniques.<name>`` for the on/off field, ``techniques.<name>.<key>`` for its options); the alias
row, the flag, its help and the README check follow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import schema
from .errors import ConfigError

log = logging.getLogger("converter")


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
    # weights below 8 bits that are not block-wise written as int8 holding the same integers (``weights.storage:
    # auto``): the target has 8-bit kernels for their layers and none for 4-bit ones, which it would dequantize and
    # run in float (converter.quant.qdq)
    low_bit_weights_as_int8: bool = False
    # 8-bit depthwise Conv weights symmetric (int8, zero point 0) even where weights are asymmetric (weight_symmetric:
    # false, which is there for 4-bit grids): the target's depthwise kernel with unsigned per-channel zero points is
    # far slower than with signed weights (converter.quant.plan)
    symmetric_8bit_depthwise: bool = False


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
        # EfficientNet-Lite0 W4A8: packed int4, 48 Convs run in float on dequantized weights, 32.3 ms batch-1 (FP32
        # 8.1 ms); the same integers in int8, 49 QLinearConv, 4.55 ms, the same top-1 (774/900)
        low_bit_weights_as_int8=True,
        # EfficientNet-Lite0, 4-bit asymmetric weights with first/last and the 16 depthwise Convs at 8 bits: uint8
        # depthwise weights with their zero points ran the model at 14.1x FP32's batch-1 time on 49 QLinearConv
        symmetric_8bit_depthwise=True,
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

CALIB_METHODS = ("minmax", "minmax_ema", "percentile", "entropy", "mse", "auto")
WEIGHT_CALIB_METHODS = ("minmax", "mse")
WEIGHT_STORAGES = ("auto", "packed", "int8")  # weights below 8 bits: auto, packed int4, int8 with the same integers
ENCODINGS_VERSIONS = ("1.0.0", "0.6.1", "2.0.0")
PROVIDERS = ("auto", "cpu", "cuda")
CLE_RELU6_MODES = ("keep", "min", "replace")
WEIGHT_BITS = (4, 8)
WEIGHT_BLOCK_SIZES = (32, 64, 128)
# weight_bits_overrides keys besides node names and "op:<OpType>": the first / last layer with a weight, and every
# depthwise Conv (one input channel per group: a few weights per channel, where 4 bits hurt most)
LAYER_POSITIONS = ("first", "last", "depthwise")
BIAS_CORRECTION_MODES = ("empirical", "analytical", "auto")


def option(default: Any = dataclasses.MISSING, path: str = "", *flags: str, help: str = "",
           default_factory: Any = dataclasses.MISSING, **cli: Any) -> Any:
    """A QuantConfig / SearchConfig field with its metadata, written once: ``path`` (its place in the sectioned
    file, e.g. ``weights.bits``; the flat field name is its alias), the command-line ``flags`` (empty: a config-file
    key only) with their ``help`` and argparse keywords (``type``, ``choices``, ``action``, ``metavar``, ...;
    ``converter.cli`` adds every flag from here)."""
    meta = {"path": path, "flags": flags, "help": help, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _comma_list(text: str) -> tuple[str, ...]:
    """``--exclude-nodes a,b``: the names, blanks dropped."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _alpha(text: str) -> float | str:
    """--smoothquant-alpha: ``auto`` or a number (the config checks its range)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:  # the command line shows this message (converter.commands.config_flags)
        raise ValueError(f"expected a number in (0, 1) or auto, got {text!r}") from None


WEIGHT_ALGOS = ("rtn", "gptq", "hqq")  # weight_algo: how MatMul/Gemm weights are put on their grid
SEARCH_METRICS = ("top1", "top1-agreement", "cosine", "sqnr")
METRIC_ALIASES = {"agreement": "top1-agreement"}  # old spelling -> the one spelling used by every command
SEARCH_STRATEGIES = ("gallop", "bisect", "sequential")  # converter.search.strategies.STRATEGIES
SEARCH_RANKINGS = ("propagated", "single-op", "end-to-end", "subset")  # converter.search.fallback.RANKINGS
SEARCH_FALLBACKS = ("auto", "float", "int16")  # converter.search.fallback.FALLBACKS


def _metric_name(text: str) -> str:
    return METRIC_ALIASES.get(text, text)


@dataclass(frozen=True)
class SearchConfig:
    """The accuracy search (``search:`` in a config or job file, ``QuantConfig(search=SearchConfig(...))``, the
    search flags of ``qconvert quantize``): keep the fewest layers in float that meet the target. It runs when a
    metric or an evaluator is set. Paths in a file are relative to that file's folder."""

    metric: str | None = option(None, "search.metric", "--target-metric", type=_metric_name, dest="target_metric",
                                choices=list(SEARCH_METRICS),
                                help="built-in metric on --eval data (top1-agreement: top-1 agreement with FP32); "
                                     "turns the fallback search on")
    evaluator: str | None = option(None, "search.evaluator", "--evaluator", "--evaluate",
                                   help="custom metric: path/to/file.py:fn or pkg.mod:fn, fn(model_path) -> float; "
                                        "turns the fallback search on")
    eval: str | None = option(None, "search.eval", "--eval",
                              help="evaluation data for --target-metric (same formats as --calib)")
    labels: str | None = option(None, "search.labels", "--labels",
                                help="labels for --target-metric top1 (.npy of ints or one per line)")
    max_drop: float | None = option(None, "search.max_drop", "--max-drop", type=float,
                                    help="allowed metric drop from FP32 (default: 0.01)")
    relative_drop: bool = option(False, "search.relative_drop", "--relative-drop", action="store_true",
                                 help="--max-drop is a fraction of the FP32 metric")
    min_metric: float | None = option(None, "search.min_metric", "--min-metric", type=float,
                                      help="absolute metric the quantized model must reach (default: none)")
    eval_output: str | None = option(None, "search.eval_output", "--eval-output",
                                     help="graph output the metric reads (default: the first; 'all': the worst "
                                          "output's score, for cosine/sqnr)")
    strategy: str = option("gallop", "search.strategy", "--strategy", choices=list(SEARCH_STRATEGIES),
                           help="how many of the ranked layers to keep in float (default: gallop, 1, 2, 4... then "
                                "bisect)")
    ranking: str = option("propagated", "search.ranking", "--ranking", choices=list(SEARCH_RANKINGS),
                          help="how layers are ranked (default: propagated, each layer alone quantized, model "
                               "outputs compared)")
    sensitivity_samples: int = option(8, "search.sensitivity_samples", "--sensitivity-samples", type=int,
                                      help="calibration samples the ranking runs on (default: 8)")
    fallback: str = option("auto", "search.fallback", "--fallback", choices=list(SEARCH_FALLBACKS),
                           help="int16: try 16-bit activations for the sensitive layers before float; auto "
                                "(default): int16 on --target qnn, float elsewhere (ORT CPU has no fast 16-bit "
                                "kernels)")
    give_back: bool = option(True, "search.give_back", "--no-give-back", action="store_false",
                             help="keep the strategy's whole prefix in float (default: re-quantize the layers not "
                                  "needed)")
    max_float_fraction: float | None = option(
        None, "search.max_float_fraction", "--max-float-fraction", type=float,
        help="exit 1 when more than this share of the compute layers ends in float (the model and report are still "
             "written) (default: none)")
    max_evaluations: int | None = option(
        None, "search.max_evaluations", "--max-evaluations", type=int, metavar="N",
        help="budget of full evaluations, FP32 and all-INT8 included; when it ends the search the best model so far "
             "is kept and the report says so (default: 2 + 4 x ceil(log2 ranked layers))")
    # the search's own latency limit (a config-file key; --max-latency-ratio sets target.max_latency_ratio, which
    # the search reads when this is unset): a model meeting the target but slower than R x FP32 (ORT CPU, batch 1)
    # exits 1 with the accuracy/latency trade-offs found (default: 1.0 on target ort-cpu for a model whose FP32 run
    # takes >= 0.05 ms, none elsewhere)
    max_latency_ratio: float | None = option(None, "search.max_latency_ratio")

    def __post_init__(self) -> None:
        if self.metric is not None:
            object.__setattr__(self, "metric", _metric_name(self.metric))
            _check_choice("search.metric", self.metric, SEARCH_METRICS)
        _check_choice("search.strategy", self.strategy, SEARCH_STRATEGIES)
        _check_choice("search.ranking", self.ranking, SEARCH_RANKINGS)
        _check_choice("search.fallback", self.fallback, SEARCH_FALLBACKS)
        if not self.metric and not self.evaluator:
            raise ConfigError("the search section needs a metric or an evaluator",
                              "add 'metric: top1|top1-agreement|cosine|sqnr' (with 'eval: DIR'), or 'evaluator: "
                              "file.py:fn'")
        if self.metric and not self.evaluator and not self.eval:
            raise ConfigError(f"search.metric {self.metric} needs evaluation data", "add 'eval: DIR' to the search "
                              "section (--eval DIR; same formats as the calibration data)")
        if self.metric == "top1" and not self.evaluator and not self.labels:
            raise ConfigError("search.metric top1 needs labels", "add 'labels: FILE' (--labels), or use metric "
                              "top1-agreement (top-1 agreement with FP32)")
        schema.check({k: getattr(self, k) for k in _SEARCH_RANGES}, _SEARCH_SCHEMA,
                     "the search options (SearchConfig)", prefix="search", label="config key ")
        if self.max_evaluations is not None and self.max_evaluations < 2:
            raise ConfigError(f"search.max_evaluations must be at least 2 (FP32 and all-INT8), got "
                              f"{self.max_evaluations}", "use e.g. 20, or leave it out for the default")

    def replace(self, **changes: Any) -> "SearchConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, base: Path) -> "SearchConfig":
        """The paths (eval, labels, a file.py evaluator) made absolute against ``base`` (the file's folder)."""
        def rel(p: str | None) -> str | None:
            return p if p is None or Path(p).is_absolute() else str(base / p)

        ev = self.evaluator
        if ev and ":" in ev and ev.rsplit(":", 1)[0].endswith(".py"):
            ev = f"{rel(ev.rsplit(':', 1)[0])}:{ev.rsplit(':', 1)[1]}"
        return self.replace(eval=rel(self.eval), labels=rel(self.labels), evaluator=ev)


@dataclass(frozen=True)
class QuantConfig:
    """Everything that decides how a model is quantized. Validated on construction.

    **Sections.** A config file (and a job file's ``defaults``/``config``) is written in sections::

        target:       {name: ort-cpu, op_types, exclude_nodes, int16_nodes, exclude_with_inputs, subgraphs}
        activations:  {bits, max_shared_scale_loss_bits}
        weights:      {calib, symmetric, per_channel, bits, block_size, bits_overrides}
        calibration:  {method, percentile, max_samples, batch_size, overrides, ema_momentum, histogram_bins,
                       histogram_subsample, memory_budget_mb}
        runtime:      {providers, threads, custom_op_libraries}
        encodings:    {version, all_tensors}
        techniques:   {smoothquant: {alpha}, cle: {relu6}, rotation: {candidates}, bias_correction: {mode},
                       fast_bias_correction: {},
                       adaround: {iterations, search}}       # a technique's section: null/false = off, {} = on
        search:       SearchConfig (metric, eval, labels, max_drop, ...): the accuracy search runs

    and read back the same way in Python (``config.weights.bits``, ``config.techniques.cle`` is None when off).
    Each field below is stored flat (``config.weight_bits``: the name every module reads) and declares its section
    path with :func:`option`; that path is the **alias table** (:data:`ALIASES`, flat key -> section path, built
    from the fields): a file may still use the flat key (``weight_bits: 4``), with a deprecation note naming
    ``weights.bits``, once per key. ``target: ort-cpu`` (a string) is short for ``target: {name: ort-cpu}``.

    **Adding an option** is one field here: ``name: type = option(default, "section.key", "--flag", help=...,
    type=..., choices=...)`` (a technique's options: path ``techniques.<technique>.<key>``, its on/off field
    ``techniques.<technique>``). The file key, the alias, the type check, the ``qconvert quantize`` flag and its
    help follow from it; range checks go into ``__post_init__``; the README's config table lists it
    (tests/test_config_sections.py checks both).
    """

    target: str = option("ort-cpu", "target.name", "--target", choices=list(TARGETS),
                         help="runtime whose quantization rules are used")
    calib_method: str = option("minmax", "calibration.method", "--calib-method", choices=list(CALIB_METHODS),
                               help="activation ranges; auto: each tensor's range chosen from calib_auto_candidates by the error "
                                    "at the layer reading it, the choices in the report's calib_choice block "
                                    "(per-tensor/op-type overrides: calib_overrides in --config)")
    # weights: minmax (max |w| per channel) or mse (clipping that minimises MSE)
    weight_calib: str = option("minmax", "weights.calib", "--weight-calib", choices=list(WEIGHT_CALIB_METHODS),
                               help="weight ranges per channel: max |w| or the clipping that minimises MSE")
    # weights symmetric (signed, zero point 0) or asymmetric (unsigned, a zero point per channel: skewed channels
    # use every level; targets whose kernels need zero-point-free weights reject it)
    weight_symmetric: bool = option(True, "weights.symmetric", "--weight-symmetric",
                                    action="BooleanOptionalAction",
                                    help="weights symmetric (zero point 0) or, with --no-weight-symmetric, asymmetric "
                                         "per channel (unsigned, a zero point each: skewed channels, such as 4-bit "
                                         "depthwise kernels, use every level; ort-cpu only) (default: symmetric)")
    percentile: float = option(99.999, "calibration.percentile", "--percentile", type=float,
                               help="for --calib-method percentile")
    per_channel: bool = option(True, "weights.per_channel", "--per-channel", "--per-tensor", action="per_channel",
                               help="one weight scale per output channel (default)|one weight scale per tensor")
    activation_bits: int = option(8, "activations.bits", "--activation-bits", type=int, choices=[8, 16],
                                  help="activation bit width (16 for the qnn target)")
    # 8, or 4: int4 weights (packed, opset 21 DequantizeLinear), per channel or per tensor
    weight_bits: int = option(8, "weights.bits", "--weight-bits", type=int,
                              help="weight bit width: 8, or 4 (int4 per channel, packed, ONNX opset 21) (default: 8); "
                                   "per-layer widths: weight_bits_overrides in --config (e.g. {first: 8, last: 8})")
    # block-wise weights (opset 21 blocked DequantizeLinear): one scale per block of this many input channels and
    # output channel, for MatMul (2-D weights), Gemm and Conv; None: per channel (converter.quant.plan)
    weight_block_size: int | None = option(None, "weights.block_size", "--weight-block-size", type=int,
                                           help="block-wise weights: one scale per block of 32, 64 or 128 input "
                                                "channels of each output channel (ONNX opset 21 blocked "
                                                "DequantizeLinear) for Conv, Gemm and 2-D MatMul weights (default: "
                                                "per channel)")
    # how weights below 8 bits are written: packed int4 (the size), or int8 holding the same integers (the target's
    # 8-bit kernels run them); auto: int8 where the target has no kernel for them (ort-cpu), else packed
    weight_storage: str = option("auto", "weights.storage", "--weight-storage", choices=list(WEIGHT_STORAGES),
                                 help="weights below 8 bits (not block-wise) in the QDQ model: packed int4, or int8 "
                                      "holding the same integers so 8-bit kernels run their layers; auto: int8 on "
                                      "ort-cpu (no 4-bit Conv/Gemm kernel), else packed (default: auto); the "
                                      "encodings file keeps the real width")
    # per-layer weight widths: {node name | "op:<OpType>" | "first" | "last": 4 | 8}; a node name wins over
    # first/last, which win over op:, which wins over weight_bits ("first: 8, last: 8" keeps both ends at 8 bits)
    weight_bits_overrides: dict[str, int] = option(path="weights.bits_overrides", default_factory=dict)
    max_samples: int | None = option(None, "calibration.max_samples", "--max-samples", type=int,
                                     help="use at most N calibration samples (default: all)")
    batch_size: int = option(16, "calibration.batch_size", "--batch-size", type=int,
                             help="samples per ONNX Runtime run; a larger batch is capped where the model's tensors "
                                  "would take over 1 GiB per run")
    op_types: tuple[str, ...] | None = option(None, "target.op_types")  # overrides the target's op types
    exclude_nodes: tuple[str, ...] = option((), "target.exclude_nodes", "--exclude-nodes", type=_comma_list,
                                            help="comma-separated node names to keep in float (default: none)")
    int16_nodes: tuple[str, ...] = option((), "target.int16_nodes")  # node names whose activations use 16 bits
    # nodes kept in float that also read their inputs in float where no quantized op reads them (the accuracy
    # search's float layers: its ranking measures exactly that); unlike exclude_nodes, a Conv/Gemm/MatMul producer
    # of such an input then loses its output Q and runs in float too, and the report counts it (ort_cpu_kernels)
    exclude_with_inputs: tuple[str, ...] = option((), "target.exclude_with_inputs")
    providers: str = option("auto", "runtime.providers", "--providers", choices=list(PROVIDERS),
                            help="execution provider for calibration; auto: CUDA if present, else CPU")
    threads: int = option(0, "runtime.threads", "--threads", type=int,
                          help="ONNX Runtime intra-op threads (default: 0, ORT decides)")
    encodings_version: str = option("1.0.0", "encodings.version", "--encodings-version",
                                    choices=list(ENCODINGS_VERSIONS), help="AIMET encodings file format")
    # write every quantized tensor (int32 biases, data-movement outputs) into 1.0.0/0.6.1 files; by default they
    # name only what AIMET quantizes, so its strict load accepts them (converter/quant/aimet_rules.py)
    encodings_all_tensors: bool = option(False, "encodings.all_tensors", "--encodings-all-tensors",
                                         action="store_true",
                                         help="also write int32 biases and data-movement outputs into 1.0.0/0.6.1 "
                                              "files, which AIMET's strict load rejects (default: only what AIMET "
                                              "quantizes)")
    # calibration: per-tensor methods ({tensor name | "op:<OpType>": method}), EMA momentum of minmax_ema,
    # histogram bins covering [0, max|x|], histogram values per sample and tensor (0: all), memory bound
    calib_overrides: dict[str, str] = option(path="calibration.overrides", default_factory=dict)
    ema_momentum: float = option(0.01, "calibration.ema_momentum")
    histogram_bins: int = option(2048, "calibration.histogram_bins")
    histogram_subsample: int = option(16384, "calibration.histogram_subsample")
    calib_memory_budget_mb: int = option(1024, "calibration.memory_budget_mb")
    # a scale group (Concat inputs and output) is split when sharing one encoding would cost a member more
    # than this many bits of resolution (see converter.quant.scale_groups); None keeps every group whole
    max_shared_scale_loss_bits: float | None = option(3.0, "activations.max_shared_scale_loss_bits")
    # SmoothQuant on MatMul/Gemm inputs with outlier channels (applied only where it lowers the quantized layers'
    # error >= 1.5x), folded into the producer where it can be, else a float Mul; alpha "auto" (or None) picks it
    # per tensor by that error
    smoothquant: bool = option(True, "techniques.smoothquant", "--smoothquant", action="BooleanOptionalAction",
                               help="SmoothQuant MatMul/Gemm inputs whose outlier channels cost >= 1.5x the layers' "
                                    "error, 1/s folded into the producing LayerNorm/Mul/MatMul/Gemm where nothing "
                                    "else reads the tensor, else a float Mul (default: on)")
    smoothquant_alpha: float | str | None = option(0.5, "techniques.smoothquant.alpha", "--smoothquant-alpha",
                                                   type=_alpha,
                                                   help="migration strength alpha in (0, 1), or auto: per tensor by "
                                                        "the quantized layers' error (default: 0.5)")
    # a model slower than R x FP32 where it runs is no success (converter.pipeline.latency_gate): on target ort-cpu
    # quantize writes it, marks it in the report (latency_gate) and exits 1; the accuracy search refuses it
    max_latency_ratio: float | None = option(
        None, "target.max_latency_ratio", "--max-latency-ratio", type=float, metavar="R",
        help="exit 1 when the written model runs slower than R x FP32 on ONNX Runtime CPU (batch 1; the model and "
             "report are still written); the accuracy search keeps only models within it (default: 1.0 on --target "
             "ort-cpu, none elsewhere; inf: no limit)")
    # a plain quantize whose all-INT8 model breaks that limit first tries it with the layers ORT CPU runs faster in
    # float kept in float (converter.search.speed); off: the all-INT8 model is written and judged as it is
    float_where_faster: bool = option(
        True, "target.float_where_faster", "--float-where-faster", action="BooleanOptionalAction",
        help="on --target ort-cpu, when the all-INT8 model is slower than --max-latency-ratio allows, keep in float "
             "the layers ONNX Runtime CPU runs faster in float (each profiled; kept only if the model gets faster); "
             "--no-float-where-faster: write the all-INT8 model as it is (default: on)")
    # quantize inside If/Loop/Scan bodies (converter.quant.control_flow); off: bodies stay in float
    quantize_subgraphs: bool = option(True, "target.subgraphs", "--quantize-subgraphs",
                                      action="BooleanOptionalAction",
                                      help="quantize inside If/Loop/Scan bodies with the main graph's rules "
                                           "(default: on)")
    # cross-layer equalization + high-bias absorption on the float model (converter.quant.cle); ReLU6 (Clip(0, 6))
    # between two equalized layers: "keep" (skip the pair), "min" (Relu + Min by the per-channel bound 6/s: FP32
    # unchanged, but ORT then runs the Conv before the Min in float) or "replace" it by Relu (AIMET's; FP32 changes)
    cle: bool = option(False, "techniques.cle", "--cle", action="BooleanOptionalAction",
                       help="cross-layer equalization of Conv->Conv/depthwise chains + high-bias absorption, for "
                            "per-tensor weights (default: off)")
    cle_relu6: str = option("keep", "techniques.cle.relu6", "--cle-relu6", choices=list(CLE_RELU6_MODES),
                            help="ReLU6 between equalized layers: keep (skip those pairs), min (Relu + per-channel "
                                 "Min, FP32 unchanged; ORT runs the Min on uint8) or replace by Relu (FP32 changes; "
                                 "AIMET's way)")
    # stream rotation of the float model (converter.quant.rotation): each linear residual stream (project Convs ->
    # Adds -> 1x1 Convs) turned by an orthogonal matrix, exact in float, chosen per stream by the weights' rounding
    # error on the configured grid; for low-bit per-channel weights of inverted-residual networks
    rotation: bool = option(False, "techniques.rotation", "--rotate", action="BooleanOptionalAction",
                            help="turn each linear residual stream (Convs writing it, Adds, Convs reading it) by an "
                                 "orthogonal matrix, FP32 unchanged, where that lowers the weights' rounding error; "
                                 "for 4-bit weights (default: off)")
    rotation_candidates: int = option(8, "techniques.rotation.candidates", "--rotation-candidates", type=int,
                                      metavar="N", help="random rotations tried per stream with --rotate (the "
                                                        "identity is always one more)")
    # bias correction: each quantized Conv/Gemm's bias shifted so its mean output matches the float model's
    # (converter.quant.bias_correction): "empirical" measures on calibration data; "analytical" computes the
    # weights' share from the BatchNorm statistics the layer's input comes from (layers without: untouched);
    # "auto" is analytical where those statistics reach and empirical elsewhere (AIMET's split)
    bias_correction: bool = option(False, "techniques.bias_correction", "--bias-correction",
                                   action="BooleanOptionalAction",
                                   help="shift each quantized layer's bias so its mean output on calibration data "
                                        "matches FP32 (default: off; the cheap --fast-bias-correction is on)")
    bias_correction_mode: str = option("empirical", "techniques.bias_correction.mode", "--bias-correction-mode",
                                       choices=list(BIAS_CORRECTION_MODES),
                                       help="with --bias-correction: empirical (measured on calibration data), "
                                            "analytical (from the BatchNorm statistics a layer's input comes from, no "
                                            "data; other layers untouched) or auto (analytical where BatchNorm "
                                            "statistics reach, empirical elsewhere)")
    # the default's cheap bias correction (converter.techniques.fast_bias_correction): depthwise Convs only, one
    # measurement on 16 calibration samples; off where bias_correction (the full one) runs
    fast_bias_correction: bool = option(True, "techniques.fast_bias_correction", "--fast-bias-correction",
                                        action="BooleanOptionalAction",
                                        help="the cheap bias correction of the default: each depthwise Conv's bias "
                                             "shifted by its mean output error, measured once on 16 calibration "
                                             "samples; --bias-correction replaces it (default: on)")
    # AdaRound: each Conv/ConvTranspose/Gemm/MatMul's weights rounded up or down to reconstruct its output on
    # calibration data (converter.quant.adaround), this many Adam steps per layer (AIMET's default: 10000; 0: none,
    # the local search alone); adaround_search: then a greedy local search on the layer's quadratic loss from the
    # better of nearest and AdaRound (the lowest loss of the three is kept)
    adaround: bool = option(False, "techniques.adaround", "--adaround", action="BooleanOptionalAction",
                            help="AdaRound: round each Conv/ConvTranspose/Gemm/MatMul weight up or down to "
                                 "reconstruct the layer's float output on calibration data, for 4-bit weights above "
                                 "all (default: off)")
    adaround_iterations: int = option(1000, "techniques.adaround.iterations", "--adaround-iterations", type=int,
                                      metavar="N",
                                      help="optimization steps per layer for --adaround; 0: none, the local search "
                                           "alone (fast)")
    adaround_search: bool = option(True, "techniques.adaround.search", "--adaround-search",
                                   action="BooleanOptionalAction",
                                   help="with --adaround: a greedy local search on each layer's quadratic "
                                        "reconstruction loss after the Adam steps; the lowest loss of nearest, "
                                        "AdaRound and the search is kept (default: on)")
    # reconstruction beyond single layers (converter.quant.reconstruction). adaquant: each layer's weights, bias and
    # per-channel scale learned against its float output; block_reconstruction: each block's (single-tensor cuts,
    # ending in a linear output or a residual Add) weight rounding learned together against the block's float output
    # (with adaquant: its weights and scales); its iterations / qdrop serve AdaQuant too
    adaquant: bool = option(False, "techniques.adaquant", "--adaquant", action="BooleanOptionalAction",
                            help="AdaQuant: learn each Conv/Gemm/MatMul layer's weights, bias and per-channel scale "
                                 "against its float output on calibration data (with --block-reconstruction: block "
                                 "by block) (default: off)")
    block_reconstruction: bool = option(False, "techniques.block_reconstruction", "--block-reconstruction",
                                        action="BooleanOptionalAction",
                                        help="BRECQ/QDrop: learn the weight rounding of each block (e.g. expand, "
                                             "depthwise and project Conv + Add) together against the block's float "
                                             "output (default: off)")
    reconstruction_iterations: int = option(300, "techniques.block_reconstruction.iterations",
                                            "--reconstruction-iterations", type=int, metavar="N",
                                            help="Adam steps per layer/block for --adaquant / --block-reconstruction")
    # network tuning (converter.quant.network_tuning): per-channel weight scales and biases learned end to end
    network_tuning: bool = option(False, "techniques.network_tuning", "--network-tuning",
                                  action="BooleanOptionalAction",
                                  help="learn every quantized layer's per-channel weight scale and bias against the "
                                       "float model's outputs on calibration data, after the other techniques "
                                       "(default: off)")
    network_tuning_epochs: int = option(12, "techniques.network_tuning.epochs", "--network-tuning-epochs", type=int,
                                        metavar="N", help="passes over the calibration samples for --network-tuning")
    network_tuning_mixup: bool = option(False, "techniques.network_tuning.mixup", "--network-tuning-mixup",
                                        action="BooleanOptionalAction",
                                        help="network tuning on mixed calibration samples (each step's inputs "
                                             "blended with others, the float model's outputs on them the target): "
                                             "closer to FP32 over more epochs (default: off)")
    reconstruction_qdrop: bool = option(False, "techniques.block_reconstruction.qdrop", "--reconstruction-qdrop",
                                        action="BooleanOptionalAction",
                                        help="QDrop while reconstructing: each activation element keeps its float "
                                             "value with probability 0.5 in training; for low-bit activations "
                                             "(default: off)")
    # where the torch-side techniques run (auto: cuda when torch sees a GPU, else cpu with one log line)
    device: str = option("auto", "runtime.device", "--device", choices=["auto", "cpu", "cuda"],
                         help="where the torch-side techniques (AdaRound, AdaQuant, block reconstruction) run; auto: "
                              "cuda when torch sees a GPU, else cpu; ONNX Runtime keeps its providers")
    # how MatMul/Gemm weights are put on their grid: rtn (nearest rounding), gptq (converter.quant.gptq: column by
    # column against the layer's input Hessian, calibration data) or hqq (converter.quant.hqq: each block's scale and
    # zero point fitted, no data; asymmetric, ort-cpu only)
    weight_algo: str = option("rtn", "weights.algo", "--weight-algo", choices=list(WEIGHT_ALGOS),
                              help="how MatMul/Gemm weights are put on their grid: rtn (nearest rounding), gptq "
                                   "(column by column against the layer's inputs on calibration data) or hqq (each "
                                   "block's scale and zero point fitted, no data; ort-cpu)")
    # weights alone quantized, every activation left in float (what ONNX Runtime's MatMulNBitsQuantizer makes): with
    # block-wise MatMul weights on ort-cpu every weight MatMul then runs as MatMulNBits and nothing else is quantized
    weight_only: bool = option(False, "weights.only", "--weight-only", action="BooleanOptionalAction",
                               help="quantize the weights alone, every activation left in float (with "
                                    "--weight-block-size on ort-cpu: every weight MatMul runs as MatMulNBits) "
                                    "(default: off)")
    # shared libraries with ONNX Runtime custom-op kernels, registered in every session (--custom-op-library;
    # converter.ort_session.use_custom_op_libraries); a --custom-op-library adds to the config file's
    custom_op_libraries: tuple[str, ...] = option((), "runtime.custom_op_libraries", "--custom-op-library",
                                                  action="append", dest="custom_op_library", metavar="PATH",
                                                  help="shared library with ONNX Runtime custom-op kernels, "
                                                       "registered in every session (repeatable; config key "
                                                       "custom_op_libraries) (default: none)")
    # calib_method "auto" (or "auto" in calib_overrides): each such activation's range is the candidate (a method,
    # or "percentile:<p>") with the least error at the layers reading it, measured on calib_auto_samples calibration
    # samples (converter.techniques.calib_choice); the report's calib_choice block holds the choices as
    # calib_overrides to freeze them
    calib_auto_candidates: tuple[str, ...] = option(
        ("minmax", "percentile:99.9", "percentile:99.99", "percentile:99.999", "mse", "entropy"),
        "calibration.auto_candidates", help="range candidates --calib-method auto chooses from per tensor")
    calib_auto_samples: int = option(32, "calibration.auto_samples",
                                     help="calibration samples --calib-method auto scores each candidate on")
    # after the layer-level choice, at most this many whole-model evaluations refine it by the error at the model's
    # outputs (converter.techniques.calib_choice.refine); 0: the layer-level choice alone
    calib_auto_evals: int = option(24, "calibration.auto_evals",
                                   help="whole-model evaluations --calib-method auto refines its choice with "
                                        "(0: the layer-level choice alone)")
    # the accuracy search (SearchConfig); None: quantize only. converter.quantize / the batch worker / qconvert
    # quantize run the search when it is set
    search: SearchConfig | None = option(None, "search")

    def __post_init__(self) -> None:
        _check_choice("target", self.target, tuple(TARGETS))
        _check_choice("calib_method", self.calib_method, CALIB_METHODS)
        _check_choice("weight_calib", self.weight_calib, WEIGHT_CALIB_METHODS)
        _check_choice("weight_storage", self.weight_storage, WEIGHT_STORAGES)
        _check_choice("encodings_version", self.encodings_version, ENCODINGS_VERSIONS)
        _check_choice("providers", self.providers, PROVIDERS)
        _check_choice("activation_bits", self.activation_bits, (8, 16))
        _check_choice("cle_relu6", self.cle_relu6, CLE_RELU6_MODES)
        _check_choice("bias_correction_mode", self.bias_correction_mode, BIAS_CORRECTION_MODES)
        _check_weights(self)
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))  # issue 26
        if self.reconstruction_iterations < 0:
            raise ConfigError(f"reconstruction_iterations must be >= 0, got {self.reconstruction_iterations}",
                              "use e.g. 300 (0: nearest rounding's loss measured, nothing learned)")
        if self.max_latency_ratio is not None and not self.max_latency_ratio > 0:
            raise ConfigError(f"max_latency_ratio must be > 0, got {self.max_latency_ratio}",
                              "use e.g. 1.0 (no slower than FP32), 1.2, or inf for no limit")
        if self.rotation_candidates < 0:
            raise ConfigError(f"rotation_candidates must be >= 0, got {self.rotation_candidates}",
                              "use e.g. 8 (0: the identity alone, nothing rotated)")
        if self.network_tuning_epochs < 1:
            raise ConfigError(f"network_tuning_epochs must be >= 1, got {self.network_tuning_epochs}",
                              "use e.g. 12 (or drop --network-tuning)")
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
        if isinstance(self.search, dict):
            object.__setattr__(self, "search", SearchConfig(**self.search))
        elif self.search is not None and not isinstance(self.search, SearchConfig):
            raise ConfigError(f"search must be a SearchConfig or a mapping of its keys, got {self.search!r}",
                              "e.g. QuantConfig(search=SearchConfig(metric='top1-agreement', eval='eval_data/'))")

    @property
    def preset(self) -> TargetPreset:
        return TARGETS[self.target]

    @property
    def low_bit_weights_as_int8(self) -> bool:
        """Weights below 8 bits (not block-wise) are written as int8 holding the same integers (``weight_storage``)."""
        return self.weight_storage == "int8" or (self.weight_storage == "auto" and self.preset.low_bit_weights_as_int8)

    def quantized_op_types(self) -> frozenset[str] | None:
        return frozenset(self.op_types) if self.op_types is not None else self.preset.op_types

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The flat keys (what reports and job hashes record); ``search`` only where it is set."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "search"}
        d = json.loads(json.dumps(d, default=str))  # tuples -> lists, dicts copied
        d["custom_op_libraries"] = [str(p) for p in self.custom_op_libraries]
        if self.search is not None:
            d["search"] = self.search.to_dict()
        return d

    def to_sections(self) -> dict[str, Any]:
        """The sectioned form of a config file (techniques switched off: ``null``); ``from_dict`` reads it back."""
        out: dict[str, Any] = {}
        flat = self.to_dict()
        for name, path in ALIASES.items():
            parts = path.split(".")
            if parts[0] == "techniques" and len(parts) == 2:
                continue  # the on/off fields: below
            if parts[0] == "techniques" and not getattr(self, _TECHNIQUE_SWITCH[parts[1]]):
                continue
            node = out
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = flat[name]
        for tech, switch in _TECHNIQUE_SWITCH.items():
            sec = out.setdefault("techniques", {})
            sec[tech] = (sec.get(tech) or {}) if getattr(self, switch) else None
        if self.search is not None:
            out["search"] = self.search.to_dict()
        return out

    def __getattr__(self, name: str) -> Any:  # the section views: config.weights.bits, config.techniques.cle
        if name in _SECTION_NAMES:
            return _SectionView(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config>", lines: dict[str, int] | None = None,
                  base: str | Path | None = None) -> "QuantConfig":
        """Validate a mapping of config keys (sectioned, flat, or both) and build the config; every error names
        the key, ``source`` and its line (``lines``: key or dotted section path -> line). ``base``: the folder the
        search section's relative paths are relative to (a file's folder)."""
        return cls.from_mappings([(data, source, lines or {})], base)

    @classmethod
    def from_mappings(cls, parts: list[tuple[dict[str, Any], str, dict[str, int]]],
                      base: str | Path | None = None) -> "QuantConfig":
        """The one validator of config mappings (config files, a job file's ``defaults`` and each job's ``config``
        and ``search``): ``parts`` = [(mapping, source, lines)], a later mapping overriding an earlier one key by
        key (the search section too). Errors name the key, the part's source and the line."""
        flat: dict[str, Any] = {}
        search: dict[str, Any] | None = None
        source = "<config>"
        for data, source, lines in parts:
            part, part_lines = flatten(data, source, lines)
            raw = part.pop("search", None)
            for key, value in part.items():
                schema.check_value(key, value, _QUANT_SCHEMA[key], _where(source, part_lines.get(key)), "config key ")
            flat.update(part)
            if raw is not None:
                _search_check(raw, source, lines)
                search = {**(search or {}), **(raw.to_dict() if isinstance(raw, SearchConfig) else raw)}
        try:
            found = None
            if search is not None:
                found = SearchConfig(**search)
                found = found.resolved(Path(base)) if base is not None else found
            return cls(**flat, search=found)
        except ConfigError as exc:
            raise ConfigError(f"{exc.message} (in {source})", exc.fix) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "QuantConfig":
        data, lines = load_mapping(path)
        return cls.from_dict(data, str(path), lines, base=Path(path).resolve().parent)


# --- sections and the alias table ------------------------------------------------------------------------------

# flat key -> section path, from the fields' option(...) (one row per field: adding a field adds its row)
# a field declared without option(...) (a plain default) is a top-level key of its own until it gets a section
ALIASES: dict[str, str] = {f.name: f.metadata.get("path") or f.name for f in dataclasses.fields(QuantConfig)
                           if f.name != "search"}
SECTIONS = ("target", "activations", "weights", "calibration", "runtime", "encodings", "techniques", "search")
_SECTION_NAMES = frozenset(SECTIONS) - {"target", "search"}  # config.target stays the preset name
_BY_PATH = {path: name for name, path in ALIASES.items()}
_TECHNIQUE_SWITCH = {p.split(".")[1]: n for n, p in ALIASES.items() if p.startswith("techniques.") and p.count(".") == 1}
_warned: set[str] = set()


class _SectionView:
    """``config.weights``: the section's keys read from the flat fields (``config.weights.bits``)."""

    def __init__(self, config: QuantConfig, prefix: str) -> None:
        self._config, self._prefix = config, prefix

    def __getattr__(self, key: str) -> Any:
        path = f"{self._prefix}.{key}"
        if path in _BY_PATH:
            if self._prefix == "techniques" and path.count(".") == 1:  # a technique: None = off, else its options
                return _SectionView(self._config, path) if getattr(self._config, _BY_PATH[path]) else None
            return getattr(self._config, _BY_PATH[path])
        raise AttributeError(f"config section {self._prefix!r} has no key {key!r}")

    def __repr__(self) -> str:
        keys = {p[len(self._prefix) + 1:]: getattr(self._config, n) for p, n in _BY_PATH.items()
                if p.startswith(self._prefix + ".") and p.count(".") == self._prefix.count(".") + 1}
        return f"{self._prefix}({', '.join(f'{k}={v!r}' for k, v in keys.items())})"


_where = schema.where


def flatten(data: dict[str, Any], source: str = "<config>", lines: dict[str, int] | None = None
            ) -> tuple[dict[str, Any], dict[str, int]]:
    """A config mapping (sections, flat keys or both) -> (flat keys, flat key -> line). Unknown keys, a key given
    twice (flat and in its section) and a section that is no mapping are errors with the file and line; a flat key
    logs a deprecation note naming its section path, once per key."""
    lines = lines or {}
    flat: dict[str, Any] = {}
    flat_lines: dict[str, int] = {}
    origin: dict[str, str] = {}

    def put(name: str, value: Any, path: str) -> None:
        line = lines.get(path)
        if name in flat:
            raise ConfigError(f"config key {path!r} in {_where(source, line)} sets {ALIASES.get(name, name)!r} "
                              f"again (also given as {origin[name]!r})", f"keep only {ALIASES.get(name, name)}")
        flat[name], origin[name] = value, path
        if line:
            flat_lines[name] = line

    def section(path: str, value: Any) -> None:
        line = lines.get(path)
        if not isinstance(value, dict):
            raise ConfigError(f"config section {path!r} in {_where(source, line)} must be a mapping, got {value!r}",
                              f"write its keys indented below '{path.split('.')[-1]}:'")
        for key, v in value.items():
            sub = f"{path}.{key}"
            if sub in _BY_PATH and path == "techniques":
                technique(sub, v)
            elif sub in _BY_PATH:
                put(_BY_PATH[sub], v, sub)
            else:
                known = sorted(p[len(path) + 1:] for p in _BY_PATH if p.startswith(path + ".")
                               and p.count(".") == path.count(".") + 1)
                raise schema.unknown(sub, _where(source, lines.get(sub)), known, "config key ")

    def technique(path: str, value: Any) -> None:
        if value is None or isinstance(value, bool):
            put(_BY_PATH[path], bool(value), path)
        elif isinstance(value, dict):
            put(_BY_PATH[path], True, path)
            section(path, value)
        else:
            raise ConfigError(f"config key {path!r} in {_where(source, lines.get(path))} must be a mapping of its "
                              f"options, true, or null (off), got {value!r}", f"e.g. {path.split('.')[-1]}: {{}}")

    for key, value in data.items():
        if key == "search":
            if not isinstance(value, dict):
                raise ConfigError(f"config section 'search' in {_where(source, lines.get(key))} must be a mapping, "
                                  f"got {value!r}", "e.g. search: {metric: top1-agreement, eval: eval_data/, "
                                  "max_drop: 0.01}")
            flat["search"] = value
            if lines.get(key):
                flat_lines["search"] = lines[key]
        elif key == "target" and not isinstance(value, dict):
            put("target", value, "target")  # the short form of target.name
        elif key in SECTIONS:
            section(key, value)
        elif key in ALIASES and ALIASES[key] == key:
            put(key, value, key)  # a field with no section yet
        elif key in ALIASES:
            if key not in _warned:
                _warned.add(key)
                log.warning("config key %r (%s) is the flat spelling of %r; write it in its section", key,
                            _where(source, lines.get(key)), ALIASES[key])
            put(key, value, key)
        else:
            raise schema.unknown(key, _where(source, lines.get(key)), (), "config key ",
                                 f"remove it or use a section ({', '.join(SECTIONS)}) or one of: "
                                 f"{', '.join(sorted(ALIASES))}")
    return flat, flat_lines


# the search keys' ranges, checked with the key's file and line (config and job files) and by SearchConfig itself
_SEARCH_RANGES = {"max_drop": dict(low=0, fix="use e.g. max_drop: 0.01"),
                  "max_float_fraction": dict(low=0, high=1, fix="use e.g. max_float_fraction: 0.1"),
                  "max_latency_ratio": dict(low=0, open_low=True, fix="use e.g. 0.8 (at most 0.8x the FP32 latency)"),
                  "sensitivity_samples": dict(low=1, fix="use e.g. 8")}
_SEARCH_SCHEMA = {k: dataclasses.replace(rule, **_SEARCH_RANGES.get(k, {}))
                  for k, rule in schema.from_dataclass(SearchConfig).items()}
_QUANT_SCHEMA = schema.from_dataclass(QuantConfig, skip=("search",))


def _search_check(raw: Any, source: str, lines: dict[str, int]) -> None:
    if isinstance(raw, SearchConfig):
        return
    schema.check(raw, _SEARCH_SCHEMA, source, {k: lines.get(f"search.{k}", lines.get("search")) for k in raw},
                 prefix="search", label="config key ")


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
            lines = mapping_lines(node)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}", "fix the YAML/JSON syntax at the position shown") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}",
                          "write one 'key: value' per line")
    return data, lines


def mapping_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """{key: line} of a composed YAML mapping, nested keys dotted (``weights.bits``)."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                lines[prefix + k.value] = k.start_mark.line + 1
                lines.update(mapping_lines(v, f"{prefix}{k.value}."))
    return lines


def _check_weight_algo(c: "QuantConfig") -> None:
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
        check_calib_method(f"calib_overrides[{key!r}]", method)
    object.__setattr__(c, "calib_overrides", dict(c.calib_overrides))
    _check_calib_auto(c)
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


# issue 26: calib auto
def calib_method_spec(spec: str) -> tuple[str, float | None]:
    """``(method, percentile)`` of a calibration method spec: a method name, or ``percentile:<p>`` (its own
    percentile; None: the config's ``percentile``). No checks: :func:`check_calib_method` makes them."""
    method, _, value = str(spec).partition(":")
    return method, (float(value) if value else None)


def check_calib_method(key: str, spec: Any, allow_auto: bool = True) -> None:
    """``spec`` is a calibration method (``auto`` only where ``allow_auto``) or ``percentile:<p>`` with p in
    (50, 100]: else one error naming ``key``."""
    fix = ("use one of " + ", ".join(m for m in CALIB_METHODS if allow_auto or m != "auto")
           + ", or percentile:<p> with p in (50, 100], e.g. percentile:99.99")
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{key} must be a calibration method, got {spec!r}", fix)
    method, _, value = spec.partition(":")
    if method not in CALIB_METHODS or (method == "auto" and not allow_auto) or (value and method != "percentile"):
        raise ConfigError(f"{key}: {spec!r} is not a calibration method{'' if allow_auto else ' candidate'}", fix)
    if value:
        try:
            p = float(value)
        except ValueError:
            p = float("nan")
        if not 50.0 < p <= 100.0:
            raise ConfigError(f"{key}: {spec!r} needs a percentile in (50, 100]", fix)


def _check_calib_auto(c: "QuantConfig") -> None:
    cands = c.calib_auto_candidates
    if isinstance(cands, str) or not cands:
        raise ConfigError(f"calib_auto_candidates must be a non-empty list of calibration methods, got {cands!r}",
                          "e.g. [minmax, percentile:99.99, mse, entropy]")
    for i, spec in enumerate(cands):
        check_calib_method(f"calib_auto_candidates[{i}]", spec, allow_auto=False)
    if len(set(cands)) != len(cands):
        raise ConfigError(f"calib_auto_candidates lists a method twice: {list(cands)}", "list each candidate once")
    object.__setattr__(c, "calib_auto_candidates", tuple(cands))
    if isinstance(c.calib_auto_samples, bool) or not isinstance(c.calib_auto_samples, int) or c.calib_auto_samples < 1:
        raise ConfigError(f"calib_auto_samples must be an integer >= 1, got {c.calib_auto_samples!r}",
                          "use e.g. 32 (calibration samples the choice measures the layers' error on)")
    if isinstance(c.calib_auto_evals, bool) or not isinstance(c.calib_auto_evals, int) or c.calib_auto_evals < 0:
        raise ConfigError(f"calib_auto_evals must be an integer >= 0, got {c.calib_auto_evals!r}",
                          "use e.g. 24 (whole-model evaluations), or 0 for the layer-level choice alone")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}",
                          f"set {key} to one of the listed values")
