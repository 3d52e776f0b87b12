"""EvoPress for the Hugging Face ecosystem: dynamic, non-uniform compression found by evolutionary search."""

__version__ = "0.1.0"

from .compressor import EvoPressCompressor, EvoPressResult
from .configuration import EvoPressConfig
from .evaluation import evaluate_perplexity, perplexity
from .formats import read_levels_file, write_levels_file
from .hub import HubPushError, load_compressed, push_checkpoint
from .methods import register_method

__all__ = ["EvoPressCompressor", "EvoPressConfig", "EvoPressResult", "HubPushError", "evaluate_perplexity",
           "load_compressed", "perplexity", "push_checkpoint", "read_levels_file", "register_method",
           "write_levels_file", "__version__"]
