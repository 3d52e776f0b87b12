"""Where a generation's time goes: forward passes, fitness arithmetic, variant swaps, everything else.

For each method, a short EvoPress search on SmolLM2-135M (cpu preset unless `--set` says otherwise)
runs twice on the same database with the same seed, so both runs score the same candidates:

- `memory`: ours; every variant is decoded once and a swap points the layer's weight at it (no copy);
- `disk`: the reference implementation's approach; each changed layer's variant is read from its file
  on disk (and decoded) for every candidate (`database_in_memory=False`).

Depth pruning has no variants to read, so it runs once. Prints a table, writes JSON
(default benchmarks/results/search_speed.json). Ratios compare runs of one invocation only.

    python benchmarks/search_speed.py                               # all methods, 3 generations each
    python benchmarks/search_speed.py --methods sparsity --generations 5 --dtype float32
"""

from __future__ import annotations

import argparse
import os

import torch
from common import parse_overrides, write_json

from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.models import load_default_model

METHODS = {"depth": 0.25, "quantization": 3.0, "sparsity": 0.6}
PARTS = ("forward", "fitness", "swap", "other")


def measure(method: str, swap: str, args: argparse.Namespace, tokenizer) -> dict:
    model, _ = load_default_model(getattr(torch, args.dtype))
    settings = dict(method=method, target=METHODS[method], preset="cpu", generations=args.generations,
                    evaluation_tokens=0, seed=args.seed, device=args.device)
    if method != "depth":
        settings.update(database_dir=os.path.join(args.database_root, f"{method}-{args.dtype}"),
                        database_in_memory=swap == "memory")
    settings.update(parse_overrides(args.set))
    compressor = EvoPressCompressor(model, tokenizer)
    compressor.compress(EvoPressConfig(**settings), progress=False)
    timings = compressor.result.timings
    generations = len(compressor.result.history) - 1
    parts = {"forward": timings["search_forward"], "fitness": timings["search_fitness"], "swap": timings["search_swap"]}
    parts["other"] = timings["search"] - sum(parts.values())
    # The initial pool (generation 0) is scored too; per-generation figures divide the whole search.
    row = {"method": method, "swap": swap, "generations": generations, "search_seconds": timings["search"],
           "seconds_per_generation": timings["search"] / max(generations, 1),
           "tokens": sum(r["tokens"] for r in compressor.result.history),
           "levels": compressor.result.levels}
    for part in PARTS:
        row[f"{part}_seconds"] = parts[part]
        row[f"{part}_share"] = parts[part] / timings["search"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                        help="override EvoPressConfig fields, e.g. --set offspring=8 'tokens_per_selection=[256,1024]'")
    parser.add_argument("--dtype", default="float32", help="float32 on CPUs without fast bfloat16, bfloat16 on GPUs")
    parser.add_argument("--device", default=None, help="default: CUDA when present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-root", default=os.path.join(os.path.dirname(__file__), "results", "speed_db"))
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "search_speed.json"))
    args = parser.parse_args()

    _, tokenizer = load_default_model()
    rows = []
    for method in args.methods:
        for swap in (("memory",) if method == "depth" else ("memory", "disk")):
            rows.append(measure(method, swap, args, tokenizer))
            print(f"{method:>12} {swap:>6}: {rows[-1]['seconds_per_generation']:.2f} s/generation", flush=True)

    print(f"\n| method | swap | s/generation | forward | fitness | swap | other | disk/memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        memory = next(r for r in rows if r["method"] == row["method"] and r["swap"] == "memory")
        ratio = row["seconds_per_generation"] / memory["seconds_per_generation"]
        row["same_levels_as_memory"] = row["levels"] == memory["levels"]
        print(f"| {row['method']} | {row['swap']} | {row['seconds_per_generation']:.2f} | "
              + " | ".join(f"{100 * row[f'{part}_share']:.1f}%" for part in PARTS) + f" | {ratio:.2f}x |")
    write_json(args.output, {"rows": rows, "settings": vars(args),
                             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})


if __name__ == "__main__":
    main()
