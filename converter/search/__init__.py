"""Sensitivity analysis and automatic fallback search to an accuracy target."""

from ..quant.layers import Layer, plan_layers
from ..calib.readers import load_labels
from .evaluate import METRICS, AccuracyTarget, BuiltinEvaluator
from .fallback import (RANKINGS, TargetNotMetError, TooMuchFloatError, accuracy_target, auto_quantize, fallback_search,
                       quantize_with_search)
from .sensitivity import LayerScore, propagated_sensitivity, single_op_sensitivity, spearman
from .strategies import STRATEGIES, Bisect, Gallop, Sequential

__all__ = ["AccuracyTarget", "BuiltinEvaluator", "METRICS", "load_labels", "TargetNotMetError", "auto_quantize", "quantize_with_search", "accuracy_target",
           "fallback_search", "RANKINGS", "TooMuchFloatError", "propagated_sensitivity", "Gallop", "Layer", "plan_layers", "LayerScore", "single_op_sensitivity", "spearman", "STRATEGIES",
           "Bisect", "Sequential"]
