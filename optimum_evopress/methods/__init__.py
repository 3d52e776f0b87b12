"""Compression methods and their registry.

A method turns a model into a `LevelSpace` and puts units at levels; the search never sees the model.
Add one with `register_method("name", MethodClass)`.
"""

from .base import CompressionMethod, get_method_class, register_method, registered_methods
from .depth import DepthPruning
from .quantization import Quantization
from .sparsity import Sparsity

__all__ = ["CompressionMethod", "DepthPruning", "Quantization", "Sparsity", "get_method_class", "register_method",
           "registered_methods"]
