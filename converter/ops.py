"""ONNX op-type sets, in one leaf module (it imports nothing from converter), so every layer reads one copy.

A set here names a fact about op types (what carries weights, what ONNX Runtime runs on integers, what a decomposed
block may hold). Per-op *behaviour* (how an op is quantized) lives in the tables of converter/quant/rules.py.
"""

from __future__ import annotations

# --- layers ------------------------------------------------------------------------------------------------------

# the weighted layer ops of the model a user brings: what the float fraction counts, what AdaRound rounds, the anchors
# of fused blocks, the ops an exported PyTorch module's weighted layers become
WEIGHTED_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# compute ops ONNX Runtime CPU runs on integers only with their output quantized (DQ -> op -> Q: QLinearConv, QGemm);
# a MatMul alone runs as MatMulIntegerToFloat with a float output, but a 2-D MatMul + bias Add is fused into a Gemm
# first (MatMulAddFusion), so it needs the Q too
OUTPUT_Q_KERNEL_OPS = frozenset({"Conv", "Gemm"})
# the layer ops with a bias input (slot 2): what bias correction corrects
BIASED_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
# convolutions (per-channel weights along axis 0 / 1)
CONV_OPS = frozenset({"Conv", "ConvTranspose"})
# ops with weights but no quantization rule of ours
HEAVY_OPS = frozenset({"LSTM", "GRU", "RNN", "Einsum", "Attention", "MultiHeadAttention"})

# --- quantized forms -----------------------------------------------------------------------------------------------

# the quantized ops an input model must not have (it is quantized already)
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                           "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "DynamicQuantizeLinear",
                           "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
# what ONNX Runtime CPU's optimized graph runs on integers / with quantized weights: QUANTIZED_OPS less the Q/DQ ops
# themselves, plus the fused forms only ORT's optimizer makes
INTEGER_KERNELS = (QUANTIZED_OPS - {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}) | {
    "MatMulNBits", "QAttention", "QEmbedLayerNormalization"}
# the layer ops ONNX Runtime CPU runs in float (the layer ops and their fused forms)
FLOAT_LAYER_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"})
# what ONNX Runtime fuses into the layer before it (FusedConv's activation, a bias or residual Add, BatchNorm)
FUSED_FOLLOWERS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "BatchNormalization",
                             "Add"})
# the nodes that show a written model is quantized (verify counts them)
QUANTIZED_MARKERS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulNBits"})

# --- activations and value ranges ---------------------------------------------------------------------------------

# single-node activations (a block's kind is their op type)
ACTIVATION_OPS = frozenset({"Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh",
                            "Elu", "Selu", "Softplus", "Gelu"})
# outputs in a fixed small range
BOUNDED_OPS = frozenset({"Sigmoid", "Softmax", "Tanh", "HardSigmoid", "LogSoftmax"})
# outputs never negative
NONNEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax", "Abs", "Exp", "Sqrt", "HardSigmoid", "Softplus"})
# clamps: Min/Max of one tensor and one constant
CLAMP_OPS = frozenset({"Min", "Max"})
# ops that carry a huge input value through to their output (Softmax, Exp... do not)
VALUE_CARRYING_OPS = frozenset({"Add", "Sub", "Mul", "Where", "Cast", "Reshape", "Expand", "Unsqueeze", "Squeeze",
                                "Concat", "Transpose", "Identity", "Slice", "Gather", "Max", "Min", "Neg", "Tile",
                                "Flatten"})

# --- shapes and data movement --------------------------------------------------------------------------------------

RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# read only the shape of their input
SHAPE_READER_OPS = frozenset({"Shape", "Size"})
# cheap, deterministic ops worth evaluating when every input is a constant
FOLDABLE_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Transpose", "Cast", "Identity", "Flatten", "Concat",
                          "Mul", "Add", "Sub", "Div", "Neg", "Sqrt", "Reciprocal"})

# --- scale sharing -------------------------------------------------------------------------------------------------

# shared-scale ops joining different tensors: where a split can help
MULTI_INPUT_SHARED_OPS = frozenset({"Concat"})
# element-wise ops whose operands may come from differently scaled tensors
MIXED_OPERAND_OPS = frozenset({"Add", "Mul", "Sub", "Div"})
# aimet_onnx.quantsim.op_types_to_tie_qtzrs (Concat, AveragePool, Relu) + _is_htp_interpolation_op (Resize,
# Upsample): input and output share one quantizer. MaxPool is not tied in 2.42 (unary grid-preserving ops are left
# out: include_unary=False); Relu only where its input has a quantizer of its own (not after a supergroup's op)
TIED_OP_TYPES = frozenset({"Concat", "AveragePool", "Relu", "Resize", "Upsample"})

# --- decomposed math blocks (graph/math_blocks.py) ------------------------------------------------------------------

# element-wise and reduction ops a decomposed block may hold
MATH_BLOCK_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf", "Tanh", "Sigmoid",
    "HardSigmoid", "HardSwish", "Softplus", "Relu", "Clip", "Min", "Max", "ReduceMean", "ReduceSum", "ReduceMax",
    "ReduceL2", "ReduceSumSquare", "LpNormalization", "Identity", "Cast", "Expand",
})
# ops that start a block search (the nonlinear or reducing heart of a block)
MATH_BLOCK_SEEDS = frozenset({
    "Erf", "Tanh", "Sigmoid", "HardSigmoid", "Softplus", "Exp", "Log", "Relu", "Clip", "ReduceMean", "ReduceSum",
    "ReduceMax", "ReduceL2", "ReduceSumSquare", "LpNormalization",
})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "ReduceSumSquare"})
# the reductions of a normalisation (LayerNorm, RMSNorm, L2Norm)
NORM_REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"})

# --- graph structure -----------------------------------------------------------------------------------------------

CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
