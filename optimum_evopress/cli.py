"""The `evopress` console script, also registered as `optimum-cli evopress`.

Commands: `compress` (search and write a checkpoint), `evaluate` (perplexity, optionally lm-evaluation-harness
tasks), `export` (apply saved levels to the base model without a search, in any format), `push` (upload a saved
checkpoint to the Hub). Exit codes: 0 success, 1 the Hub refused or could not be reached, 2 bad input (nothing
written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections import Counter
from typing import Any, Sequence

__all__ = ["main", "build_parser", "add_commands", "run_command"]

_EXAMPLES = """examples:
  evopress compress --preset cpu --dtype float32 --target 0.25 --output smollm2-depth
  evopress compress --model ./llama --method depth --granularity sublayer --target 0.3 --output out
  evopress compress --preset cpu --method quantization --target 3 --group-size 64 --output smollm2-3bit
  evopress compress --preset cpu --method quantization --target 3 --bits 2 3 4 8 --format gptq --output smollm2-gptq
  evopress compress --preset cpu --method sparsity --target 0.6 --output smollm2-sparse-60
  evopress compress --model ./llama --config evopress_config.json --output out
  evopress evaluate --model smollm2-depth --dataset shakespeare
  evopress evaluate --model smollm2-depth --tasks arc_easy hellaswag --limit 200   (needs the [eval] extra)
  evopress export --levels smollm2-3bit --format gptq --output smollm2-3bit-gptq
  evopress push smollm2-3bit my-user/smollm2-135m-evopress-3bit --private
"""
_DESCRIPTION = "EvoPress: non-uniform LLM compression by evolutionary search."


def build_parser(prog: str = "evopress") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION, epilog=_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser)
    return parser


def add_commands(parser: argparse.ArgumentParser, examples: str = _EXAMPLES) -> None:
    """Adds the `compress`, `evaluate`, `export` and `push` commands to `parser` (also used by optimum-cli, whose
    `examples` name its own command)."""
    commands = parser.add_subparsers(dest="command", required=True, metavar="{compress,evaluate,export,push}")

    compress = commands.add_parser("compress", help="search a level per unit and write the compressed checkpoint",
                                   epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    compress.add_argument("--model", default="smollm2-135m",
                          help="local model directory or Hub id; `smollm2-135m` (default) is the built-in offline model")
    compress.add_argument("--output", required=True, help="directory for the compressed checkpoint")
    compress.add_argument("--overwrite", action="store_true",
                          help="replace an earlier EvoPress checkpoint in the output directory")
    compress.add_argument("--format", choices=["compressed-tensors", "gptq"], default=None,
                          help="quantization checkpoint format: compressed-tensors (default; plain transformers and "
                               "vLLM load it) or gptq (bits 2/3/4/8; GPTQModel and vLLM; needs the [gptq] extra)")
    compress.add_argument("--config", help="an evopress_config.json (saved config or checkpoint); flags override it")
    from .configuration import EvoPressConfig  # noqa: PLC0415

    for f in dataclasses.fields(EvoPressConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if f.name in ("survivors_per_selection", "tokens_per_selection", "bits"):
            compress.add_argument(flag, type=int, nargs="+", default=None, help=help_text)
        elif f.type == "bool":
            compress.add_argument(flag, type=_boolean, default=None, metavar="{true,false}", help=help_text)
        elif f.type == "bool | None":
            compress.add_argument(flag, type=_boolean_or_none, default=None, metavar="{true,false,none}",
                                  help=help_text + " (`none`: unset)")
        elif f.type == "float":
            compress.add_argument(flag, type=float, default=None, help=help_text)
        elif f.type == "int | None":
            compress.add_argument(flag, type=_int_or_none, default=None, help=help_text + " (`none`: unset)")
        elif f.type == "int":
            compress.add_argument(flag, type=int, default=None, help=help_text)
        else:
            compress.add_argument(flag, default=None, help=help_text)
    _add_device_map_arguments(compress)
    compress.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("evaluate", help="perplexity of a model on held-out text (and lm-eval tasks)",
                                   epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--model", required=True, help="model directory, Hub id or `smollm2-135m`")
    evaluate.add_argument("--dataset", default="wikipedia",
                          help="built-in corpus (`wikipedia`, `shakespeare`: their held-out parts), a local file (text, "
                               "JSON/JSONL, Parquet, CSV, Arrow) or folder, or a Hub dataset name")
    evaluate.add_argument("--dataset-config", default=None, help="the Hub dataset's configuration")
    evaluate.add_argument("--split", default="train", help="the Hub dataset's split")
    evaluate.add_argument("--text-column", default="text", help="the column (or JSON key) holding the text")
    evaluate.add_argument("--sequence-length", type=_positive_int, default=256, help="tokens per sequence (at least 2)")
    evaluate.add_argument("--tokens", type=_positive_int, default=None,
                          help="score N tokens only: a built-in corpus's first ones, any other source's last ones "
                               "(what `compress` holds out from calibration with --evaluation-tokens N)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=8)
    evaluate.add_argument("--device", default=None, help="`cuda`, `cpu`, ...; default: CUDA when present")
    evaluate.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                          help="dtype to load the model in (default: the checkpoint's)")
    evaluate.add_argument("--tasks", nargs="+", default=None,
                          help="lm-evaluation-harness tasks to run as well (extra [eval]; tasks whose data cannot be "
                               "loaded, e.g. offline, are reported as skipped)")
    evaluate.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for --tasks")
    evaluate.add_argument("--limit", type=int, default=None, help="examples per task for --tasks")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    export = commands.add_parser(
        "export", help="apply saved levels to the base model (no search) and write a checkpoint",
        description="Rebuilds a compressed model from saved levels without searching again: the levels and the "
                    "config come from an EvoPress checkpoint (directory or Hub repo), or from a levels file plus "
                    "--config. Use it to write another format (e.g. --format gptq) or to compress a local copy.",
        epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--levels", required=True,
                        help="an EvoPress checkpoint (directory or Hub repo id) or a levels file (`name: level` lines "
                             "or JSON)")
    export.add_argument("--model", default=None,
                        help="the base model (directory, Hub id, `smollm2-135m`); default: the checkpoint's base model")
    export.add_argument("--config", default=None,
                        help="evopress_config.json with the settings the levels were found with (needed for a levels "
                             "file)")
    export.add_argument("--output", required=True, help="directory for the checkpoint")
    export.add_argument("--format", choices=["compressed-tensors", "gptq"], default=None,
                        help="quantization checkpoint format (see `compress --help`)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an earlier EvoPress checkpoint in the output directory")
    _add_device_map_arguments(export)
    export.add_argument("--quiet", action="store_true", help="no progress bars")

    push = commands.add_parser(
        "push", help="upload a saved checkpoint with its model card to the Hugging Face Hub",
        description="Uploads an EvoPress checkpoint directory in one commit, with a model card written for the repo "
                    "and the level heat map. Needs a token with write access (--token, HF_TOKEN or `hf auth login`).",
        epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    push.add_argument("checkpoint", help="a directory written by `evopress compress` or `save_pretrained`")
    push.add_argument("repo_id", help="`name` or `namespace/name`; created when missing")
    push.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    push.add_argument("--commit-message", default=None)
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    push.add_argument("--revision", default=None, help="branch to commit to")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")


def _add_device_map_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-map", default=None,
                        help="load the model with accelerate's device_map (`auto`, `balanced`, `sequential`, or a "
                             "JSON object of module: device) to spread a model larger than one GPU over several "
                             "GPUs, the CPU and disk")
    parser.add_argument("--offload-folder", default=None, help="where --device-map offloads weights to disk")


_UNSET = "none"


def _int_or_none(text: str) -> int | str:
    if text.lower() == _UNSET:
        return _UNSET
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _boolean_or_none(text: str) -> bool | str:
    return _UNSET if text.lower() == _UNSET else _boolean(text)


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
    if isinstance(values.get("levels"), str) and values["levels"].lstrip().startswith("{"):
        try:  # `--levels '{"model.layers.3": "dropped"}'`
            values["levels"] = json.loads(values["levels"])
        except json.JSONDecodeError as err:
            raise ValueError(f"--levels: not a JSON object ({err})") from err
    return EvoPressConfig(**values)


def _load(model_name: str, dtype: str | None = None, args: argparse.Namespace | None = None):
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from .models import resolve_model_path  # noqa: PLC0415

    path = resolve_model_path(model_name)
    torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else "auto"
    placement = {}
    device_map = getattr(args, "device_map", None)
    if device_map is not None:
        if device_map.lstrip().startswith("{"):
            try:
                device_map = json.loads(device_map)
            except json.JSONDecodeError as err:
                raise ValueError(f"--device-map: not a JSON object ({err})") from err
        placement = {"device_map": device_map, "offload_folder": args.offload_folder}
    elif getattr(args, "offload_folder", None) is not None:
        raise ValueError("--offload-folder needs --device-map")
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **placement),
            AutoTokenizer.from_pretrained(path))


def _compress(args: argparse.Namespace) -> int:
    from .compressor import EvoPressCompressor, check_format  # noqa: PLC0415
    from .distributed import current_group  # noqa: PLC0415
    from .export import check_output_dir  # noqa: PLC0415

    config = _config_from_args(args)
    # Under torchrun every process runs this command; the main one reports.
    echo = print if current_group(config.device).is_main else (lambda *args, **kwargs: None)
    check_output_dir(args.output, args.overwrite)
    check_format(args.format, config)  # before the model loads
    model, tokenizer = _load(args.model, config.dtype, args)
    compressor = EvoPressCompressor(model, tokenizer)
    echo(f"EvoPress {config.method} on {args.model}: target {config.target}, search {config.search!r}, "
          f"preset {config.preset!r}" + (" (small CPU preset: short sequences, few generations)"
                                         if config.preset == "cpu" else ""))
    compressor.compress(config, save_dir=args.output, overwrite=args.overwrite, progress=not args.quiet,
                        format=args.format)
    result = compressor.result
    if "average_bits" in result.budget:
        counts = Counter(result.levels.values())
        echo(f"average bits: {result.budget['average_bits']:.4f} (target {config.target}); units per bit-width: "
              + ", ".join(f"{bits}: {counts[bits]}" for bits in sorted(counts)))
    elif "average_sparsity" in result.budget:
        sparsities = model.config.evopress["layer_sparsity"].values()
        echo(f"average sparsity: {result.budget['average_sparsity']:.4f} (target {config.target}); layers from "
              f"{min(sparsities):.1%} to {max(sparsities):.1%}")
    else:
        changed = {unit: level for unit, level in result.levels.items() if level not in ("kept",)}
        echo(f"budget: {result.budget['cost']} of {result.budget['units']} units")
        echo("compressed units: " + ", ".join(f"{unit}={level}" for unit, level in changed.items()))
    if result.perplexity:
        echo(f"held-out perplexity: dense {result.perplexity['dense']:.2f} -> compressed "
              f"{result.perplexity['compressed']:.2f}")
    echo(f"search: {result.timings['search']:.1f}s; saved to {args.output}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import check_lm_eval, evaluate_perplexity, run_lm_eval  # noqa: PLC0415

    from .compressor import _check_device  # noqa: PLC0415
    from .distributed import current_group  # noqa: PLC0415

    if args.sequence_length < 2:
        raise ValueError(f"--sequence-length: at least 2 tokens (one predicted), got {args.sequence_length}")
    _check_device(args.device, "--device")
    if args.tasks:
        check_lm_eval()  # before loading anything
    model, tokenizer = _load(args.model, args.dtype)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.sequence_length > context:
        raise ValueError(f"--sequence-length: the model reads at most {context} tokens, got {args.sequence_length}")
    model.to(current_group(args.device).resolve_device(args.device)).eval()
    value = evaluate_perplexity(model, tokenizer, args.dataset, sequence_length=args.sequence_length,
                                num_tokens=args.tokens, batch_size=args.batch_size, progress=not args.quiet,
                                dataset_config=args.dataset_config, dataset_split=args.split,
                                text_column=args.text_column)
    report: dict[str, Any] = {"model": args.model, "dataset": args.dataset, "perplexity": value}
    if args.tasks:
        report["lm_eval"] = run_lm_eval(model, tokenizer, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                        batch_size=args.batch_size)
    print(json.dumps(report))
    return 0


def _export(args: argparse.Namespace) -> int:
    import os  # noqa: PLC0415

    from .compressor import EvoPressCompressor, check_format  # noqa: PLC0415
    from .configuration import EvoPressConfig  # noqa: PLC0415
    from .export import check_output_dir  # noqa: PLC0415
    from .hub import read_record  # noqa: PLC0415

    check_output_dir(args.output, args.overwrite)
    config = EvoPressConfig.from_pretrained(args.config) if args.config else None
    base, levels = args.model, args.levels
    if os.path.isfile(args.levels):
        if config is None:
            raise ValueError("export: a levels file needs --config (the evopress_config.json the levels were found "
                             "with)")
    else:  # a checkpoint: read its record once, for the levels, the config and the base model
        record = read_record(args.levels)
        levels = record["levels"]
        config = config or EvoPressConfig.from_dict(record["config"])
        base = base or record.get("base_model")
    if not base:
        raise ValueError("export: --model is needed: the checkpoint does not name its base model")
    check_format(args.format, config, levels=levels)  # before the model loads
    model, tokenizer = _load(base, config.dtype, args)
    compressor = EvoPressCompressor(model, tokenizer)
    compressor.apply(levels, config=config, progress=not args.quiet)
    compressor.save_pretrained(args.output, overwrite=args.overwrite, format=args.format)
    print(f"applied {len(compressor.result.levels)} unit levels to {base}; saved to {args.output}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push_checkpoint  # noqa: PLC0415

    url = push_checkpoint(args.checkpoint, args.repo_id, private=args.private, commit_message=args.commit_message,
                          token=args.token, revision=args.revision, create_pr=args.create_pr)
    print(f"pushed {args.checkpoint} to {args.repo_id}: {url}")
    return 0


def run_command(args: argparse.Namespace, prog: str = "evopress") -> int:
    """Runs a parsed command; returns the exit code (errors are printed, not raised)."""
    from .hub import HubPushError  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {"compress": _compress, "evaluate": _evaluate, "export": _export, "push": _push}
    try:
        return commands[args.command](args)
    except HubPushError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, ImportError) as err:  # bad input, missing or unreadable files
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
