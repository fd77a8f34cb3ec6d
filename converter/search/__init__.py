"""Sensitivity analysis and automatic fallback search to an accuracy target."""

from ..quant.layers import Layer, plan_layers
from ..verify import load_labels
from .evaluate import METRICS, AccuracyTarget, BuiltinEvaluator
from .fallback import TargetNotMetError, auto_quantize, fallback_search
from .sensitivity import LayerScore, single_op_sensitivity, spearman
from .strategies import STRATEGIES, Bisect, Sequential

__all__ = ["AccuracyTarget", "BuiltinEvaluator", "METRICS", "load_labels", "TargetNotMetError", "auto_quantize",
           "fallback_search", "Layer", "plan_layers", "LayerScore", "single_op_sensitivity", "spearman", "STRATEGIES",
           "Bisect", "Sequential"]
