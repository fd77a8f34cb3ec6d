"""Where quantization hurts: the quant analyzer, layer-by-layer comparison and the HTML report.

    from converter.analysis import analyze, compare_models
    result = analyze("model.onnx", "calib_dir/", output_dir="analysis")   # report.json + report.html
    rows = compare_models("model.onnx", "model.qdq.onnx", "data_dir/")    # per-tensor MSE/SQNR/cosine
"""

from .analyzer import STEPS, AnalysisConfig, AnalysisResult, analyze, prepare
from .compare import TensorComparison, compare_models, format_table
from .html import render_html
from ..quant.layers import Layer, plan_layers

__all__ = ["analyze", "prepare", "AnalysisConfig", "AnalysisResult", "STEPS", "compare_models", "format_table",
           "TensorComparison", "render_html", "Layer", "plan_layers"]
