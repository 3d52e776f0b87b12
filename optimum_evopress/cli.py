"""The `evopress` console script.

Examples:
    evopress compress --preset cpu --dtype float32 --method depth --target 0.25 --output smollm2-depth
    evopress compress --model ./my-llama --method depth --granularity sublayer --target 0.3 --output out
    evopress evaluate --model smollm2-depth --dataset shakespeare
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections import Counter
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

_EXAMPLES = """examples:
  evopress compress --preset cpu --dtype float32 --target 0.25 --output smollm2-depth
  evopress compress --model ./llama --method depth --granularity sublayer --target 0.3 --output out
  evopress compress --preset cpu --method quantization --target 3 --group-size 64 --output smollm2-3bit
  evopress compress --preset cpu --method quantization --target 3 --bits 2 3 4 8 --format gptq --output smollm2-gptq
  evopress compress --preset cpu --method sparsity --target 0.6 --output smollm2-sparse-60
  evopress compress --model ./llama --config evopress_config.json --output out
  evopress evaluate --model smollm2-depth --dataset shakespeare
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evopress", description="EvoPress: non-uniform LLM compression by "
                                     "evolutionary search.", epilog=_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="search a level per unit and write the compressed checkpoint",
                                   epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    compress.add_argument("--model", default="smollm2-135m",
                          help="local model directory or Hub id; `smollm2-135m` (default) is the built-in offline model")
    compress.add_argument("--output", required=True, help="directory for the compressed checkpoint")
    compress.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    compress.add_argument("--format", choices=["compressed-tensors", "gptq"], default=None,
                          help="quantization checkpoint format: compressed-tensors (default; plain transformers and "
                               "vLLM load it) or gptq (bits 2/3/4/8; GPTQModel and vLLM; needs the [gptq] extra)")
    compress.add_argument("--config", help="an evopress_config.json (saved config or checkpoint); flags override it")
    from .configuration import EvoPressConfig  # noqa: PLC0415

    for f in dataclasses.fields(EvoPressConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.name in ("survivors_per_selection", "tokens_per_selection", "bits"):
            compress.add_argument(flag, type=int, nargs="+", default=None, help=help_text)
        elif f.type == "bool":
            compress.add_argument(flag, type=_boolean, default=None, metavar="{true,false}", help=help_text)
        elif f.type == "float":
            compress.add_argument(flag, type=float, default=None, help=help_text)
        elif f.type == "int | None":
            compress.add_argument(flag, type=_int_or_none, default=None, help=help_text + " (`none`: unset)")
        elif f.type == "int":
            compress.add_argument(flag, type=int, default=None, help=help_text)
        else:
            compress.add_argument(flag, default=None, help=help_text)
    compress.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="perplexity of a model on held-out text")
    evaluate.add_argument("--model", required=True, help="model directory, Hub id or `smollm2-135m`")
    evaluate.add_argument("--dataset", default="wikipedia", help="built-in corpus, path, or Hub dataset name")
    evaluate.add_argument("--sequence-length", type=int, default=256)
    evaluate.add_argument("--tokens", type=int, default=None, help="evaluate on the first N tokens only")
    evaluate.add_argument("--batch-size", type=int, default=8)
    return parser


_UNSET = "none"


def _int_or_none(text: str) -> int | str:
    if text.lower() == _UNSET:
        return _UNSET
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _config_from_args(args: argparse.Namespace) -> Any:
    from .configuration import EvoPressConfig  # noqa: PLC0415

    values: dict[str, Any] = EvoPressConfig.from_pretrained(args.config).to_dict() if args.config else {}
    for f in dataclasses.fields(EvoPressConfig):
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = None if value == _UNSET else value
    return EvoPressConfig(**values)


def _load(model_name: str, dtype: str | None = None):
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from .models import resolve_model_path  # noqa: PLC0415

    path = resolve_model_path(model_name)
    torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else "auto"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype), AutoTokenizer.from_pretrained(path)


def _compress(args: argparse.Namespace) -> int:
    from .compressor import EvoPressCompressor  # noqa: PLC0415
    from .export import check_output_dir  # noqa: PLC0415

    config = _config_from_args(args)
    check_output_dir(args.output, args.overwrite)
    model, tokenizer = _load(args.model, config.dtype)
    compressor = EvoPressCompressor(model, tokenizer)
    print(f"EvoPress {config.method} on {args.model}: target {config.target}, search {config.search!r}, "
          f"preset {config.preset!r}" + (" (small CPU preset: short sequences, few generations)"
                                         if config.preset == "cpu" else ""))
    compressor.compress(config, save_dir=args.output, overwrite=args.overwrite, progress=not args.quiet,
                        format=args.format)
    result = compressor.result
    if "average_bits" in result.budget:
        counts = Counter(result.levels.values())
        print(f"average bits: {result.budget['average_bits']:.4f} (target {config.target}); units per bit-width: "
              + ", ".join(f"{bits}: {counts[bits]}" for bits in sorted(counts)))
    elif "average_sparsity" in result.budget:
        sparsities = model.config.evopress["layer_sparsity"].values()
        print(f"average sparsity: {result.budget['average_sparsity']:.4f} (target {config.target}); layers from "
              f"{min(sparsities):.1%} to {max(sparsities):.1%}")
    else:
        changed = {unit: level for unit, level in result.levels.items() if level not in ("kept",)}
        print(f"budget: {result.budget['cost']} of {result.budget['units']} units")
        print("compressed units: " + ", ".join(f"{unit}={level}" for unit, level in changed.items()))
    if result.perplexity:
        print(f"held-out perplexity: dense {result.perplexity['dense']:.2f} -> compressed "
              f"{result.perplexity['compressed']:.2f}")
    print(f"search: {result.timings['search']:.1f}s; saved to {args.output}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_perplexity  # noqa: PLC0415

    model, tokenizer = _load(args.model)
    value = evaluate_perplexity(model, tokenizer, args.dataset, sequence_length=args.sequence_length,
                                num_tokens=args.tokens, batch_size=args.batch_size)
    print(json.dumps({"model": args.model, "dataset": args.dataset, "perplexity": value}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _compress(args) if args.command == "compress" else _evaluate(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"evopress: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
