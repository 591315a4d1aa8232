"""Merge kernels: pure functions of tensors and frozen parameter models, in one registry."""

from evomerge.kernels.modifiers import DepthScaling
from evomerge.kernels.registry import MergeMethod, TensorContext, get_method, methods

__all__ = ["DepthScaling", "MergeMethod", "TensorContext", "get_method", "methods"]
