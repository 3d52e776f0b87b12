"""Where a generation's time goes: forward passes, fitness arithmetic, variant swaps, everything else.

For each method, a short EvoPress search on SmolLM2-135M (cpu preset unless `--set` says otherwise)
runs in several ways on the same database with the same seed, so all score the same candidates and
must reach the same fitness values:

- `ours`: every variant is decoded once and a swap points the layer's weight at it (no copy), each
  offspring runs only from its first block that differs from the parent (prefix reuse, from the parent's
  block inputs, kept across stages and generations while the parent stays), and the fitness
  applies the output head itself: `kl` reads the teacher projected through the head (hidden-size floats
  per token), `topk_kl_renormalized` computes only the head rows at the teacher's top k;
- `stage prefix`: `ours`, but the parent's block inputs are kept for one selection stage only, so each stage
  runs the parent again on its tokens (how prefix reuse worked before the inputs were kept across stages);
- `full forward`: `ours`, but every candidate runs the whole model (`reuse_prefix=False`);
- `full head`: `ours` with the model computing its whole head, and for `kl` the teacher's full
  probabilities in float16 (`FitnessEvaluator.head_shortcuts = False`);
- `reference`: the straightforward implementation, as the reference code does it: each changed layer's
  variant is read from its file on disk (and decoded) for every candidate, every candidate runs the
  whole model and its whole head, and `kl` reads full probabilities
  (`database_in_memory=False, reuse_prefix=False`, no head shortcuts);
- `stacked`: `ours` with the offspring of each selection stage scored together, their sequences stacked
  in one forward pass per group (`candidate_batch_size=16`, the cpu preset's offspring).

The head shortcuts change float rounding only (and, for `kl`, the float16 rounding of the cached
probabilities), so the table gives the largest relative difference of the fitness values next to
whether the levels are the same. `topk_kl` has no head shortcut: it runs no `full head` row.

Depth pruning has no variants to read: its `reference` differs from `full forward` in the head only. The
search starts from one candidate (`initial_candidates=1`, which scores nothing), so the search time is the
generations' time. Per mode: seconds per generation, the shares of forward passes, fitness arithmetic, swaps and
everything else, and the decoder-block work per generation (tokens × blocks run). Prints a table,
writes JSON (default benchmarks/results/search_speed.json). Ratios compare runs of one invocation only.

    python benchmarks/search_speed.py                               # all methods, 4 generations each
    python benchmarks/search_speed.py --methods sparsity --generations 5 --dtype float32
    python benchmarks/search_speed.py --fitness topk_kl_renormalized --output benchmarks/results/speed_topk.json
    python benchmarks/search_speed.py --modes ours stacked
"""

from __future__ import annotations

import argparse
import os

import torch
from common import parse_overrides, write_json

from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.fitness import FitnessEvaluator
from optimum_evopress.methods import get_method_class
from optimum_evopress.models import load_default_model
from optimum_evopress.scoring import CandidateScorer

METHODS = {"depth": 0.25, "quantization": 3.0, "sparsity": 0.6}
# SmolLM2-135M: group size 64 divides every layer's input size (576 and 1536), as in benchmarks/quantization.py.
EXTRA = {"quantization": {"group_size": 64}}
MODES = {"ours": dict(database_in_memory=True, reuse_prefix=True, head_shortcuts=True),
         "stage prefix": dict(database_in_memory=True, reuse_prefix=True, head_shortcuts=True, keep_parent=False),
         "full forward": dict(database_in_memory=True, reuse_prefix=False, head_shortcuts=True),
         "full head": dict(database_in_memory=True, reuse_prefix=True, head_shortcuts=False),
         "reference": dict(database_in_memory=False, reuse_prefix=False, head_shortcuts=False),
         "stacked": dict(database_in_memory=True, reuse_prefix=True, head_shortcuts=True, candidate_batch_size=16)}
PARTS = ("forward", "fitness", "swap", "other")


def measure(method: str, mode: str, args: argparse.Namespace, tokenizer) -> dict:
    model, _ = load_default_model(getattr(torch, args.dtype))
    settings = dict(method=method, target=METHODS[method], preset="cpu", generations=args.generations,
                    initial_candidates=1, evaluation_tokens=0, seed=args.seed, device=args.device,
                    reuse_prefix=MODES[mode]["reuse_prefix"], fitness=args.fitness,
                    candidate_batch_size=MODES[mode].get("candidate_batch_size", 1))
    if method != "depth":
        settings.update(database_dir=os.path.join(args.database_root, f"{method}-{args.dtype}"),
                        database_in_memory=MODES[mode]["database_in_memory"], **EXTRA.get(method, {}))
    settings.update(parse_overrides(args.set))
    config = EvoPressConfig(**settings)
    # Decoder-block work: tokens through each real block (the blocks prefix reuse skips are swapped out).
    block_tokens = [0]
    def count(module, args, output):
        block_tokens[0] += (output[0] if isinstance(output, tuple) else output).shape[:-1].numel()

    hooks = [block.register_forward_hook(count) for block in model.model.layers]
    compressor = EvoPressCompressor(model, tokenizer)
    FitnessEvaluator.head_shortcuts = MODES[mode]["head_shortcuts"]
    follow = CandidateScorer._follow
    if not MODES[mode].get("keep_parent", True):  # forget the parent's block inputs before every stage
        CandidateScorer._follow = lambda self, reference: self.evaluator.invalidate_prefix(0)
    try:
        compressor.compress(config, progress=False)
    finally:
        FitnessEvaluator.head_shortcuts = True
        CandidateScorer._follow = follow
    for hook in hooks:
        hook.remove()
    timings = compressor.result.timings
    history = compressor.result.history
    generations = len(history) - 1
    # The dense outputs were computed once, through every block, on all calibration tokens.
    calibration_tokens = config.resolved_search_settings(
        get_method_class(method).default_settings(config.preset))["calibration_tokens"]
    search_block_tokens = block_tokens[0] - len(model.model.layers) * calibration_tokens
    parts = {"forward": timings["search_forward"], "fitness": timings["search_fitness"], "swap": timings["search_swap"]}
    parts["other"] = timings["search"] - sum(parts.values())
    # The initial pool (generation 0) is scored too; per-generation figures divide the whole search.
    row = {"method": method, "mode": mode, "generations": generations, "search_seconds": timings["search"],
           "seconds_per_generation": sum(r["seconds"] for r in history[1:]) / max(generations, 1),
           "block_tokens_per_generation": search_block_tokens / max(generations, 1),
           "tokens": sum(r["tokens"] for r in compressor.result.history),
           "fitness": [r["fitness"] for r in compressor.result.history], "levels": compressor.result.levels}
    for part in PARTS:
        row[f"{part}_seconds"] = parts[part]
        row[f"{part}_share"] = parts[part] / timings["search"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="`ours` always runs: the others are compared with it")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                        help="override EvoPressConfig fields, e.g. --set offspring=8 'tokens_per_selection=[256,1024]'")
    parser.add_argument("--fitness", default="kl", choices=["kl", "topk_kl", "topk_kl_renormalized"])
    parser.add_argument("--dtype", default="float32", help="float32 on CPUs without fast bfloat16, bfloat16 on GPUs")
    parser.add_argument("--device", default=None, help="default: CUDA when present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-root", default=os.path.join(os.path.dirname(__file__), "results", "speed_db"))
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "search_speed.json"))
    args = parser.parse_args()

    _, tokenizer = load_default_model()
    rows = []
    for method in args.methods:
        # Without head shortcuts (`topk_kl`), `full head` is `ours` and a depth `reference` is `full forward`.
        shortcuts = args.fitness != "topk_kl"
        modes = ["ours"] + [m for m in args.modes if m != "ours"]
        for mode in (m for m in modes
                     if shortcuts or not (m == "full head" or (method == "depth" and m == "reference"))):
            rows.append(measure(method, mode, args, tokenizer))
            print(f"{method:>12} {mode:>12}: {rows[-1]['seconds_per_generation']:.2f} s/generation", flush=True)

    print(f"\nfitness: {args.fitness}")
    print("| method | mode | s/generation | forward | fitness | swap | other | block work / ours | time / ours "
          "| same levels | fitness difference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        ours = next(r for r in rows if r["method"] == row["method"] and r["mode"] == "ours")
        row["time_over_ours"] = row["seconds_per_generation"] / ours["seconds_per_generation"]
        row["block_work_over_ours"] = row["block_tokens_per_generation"] / ours["block_tokens_per_generation"]
        row["same_levels_as_ours"] = row["levels"] == ours["levels"]
        row["fitness_difference"] = max((abs(a - b) / abs(b) if b else abs(a))
                                        for a, b in zip(row["fitness"], ours["fitness"], strict=True)
                                        if a is not None and b is not None)
        print(f"| {row['method']} | {row['mode']} | {row['seconds_per_generation']:.2f} | "
              + " | ".join(f"{100 * row[f'{part}_share']:.1f}%" for part in PARTS)
              + f" | {row['block_work_over_ours']:.2f}x | {row['time_over_ours']:.2f}x | "
              f"{'yes' if row['same_levels_as_ours'] else 'NO'} | {row['fitness_difference']:.1e} |")
    write_json(args.output, {"rows": rows, "settings": vars(args),
                             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})


if __name__ == "__main__":
    main()
