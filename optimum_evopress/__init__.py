"""EvoPress for the Hugging Face ecosystem: dynamic, non-uniform compression found by evolutionary search."""

__version__ = "0.1.0"

from .compressor import EvoPressCompressor, EvoPressResult
from .configuration import EvoPressConfig
from .evaluation import evaluate_perplexity, perplexity
from .methods import register_method

__all__ = ["EvoPressCompressor", "EvoPressConfig", "EvoPressResult", "evaluate_perplexity", "perplexity",
           "register_method", "__version__"]
