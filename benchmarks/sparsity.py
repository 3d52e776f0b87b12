"""Unstructured sparsity on SmolLM2-135M: EvoPress against uniform SparseGPT, OWL and dynamic programming.

Calibration: the built-in Wikipedia corpus (calibration articles). Evaluation: perplexity and KL to
the dense model on held-out Wikipedia articles and on Shakespeare plays never used for calibration.
At each target every search reads the same SparseGPT database (levels of a fixed weight step
around the target; see docs/sparsity.md).

    python benchmarks/sparsity.py                      # 50%, 60% and 70% (about two hours on 2 CPU cores)
    python benchmarks/sparsity.py --targets 0.7        # one target

Prints a table and writes JSON (default benchmarks/results/sparsity.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from common import HeldOut, beats_every_baseline, parse_overrides, write_json

from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.models import load_default_model

SEARCHES = ("evolution", "owl", "dynamic_programming", "uniform")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES))
    parser.add_argument("--generations", type=int, default=None, help="default: the cpu preset's")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                        help="override EvoPressConfig fields, e.g. --set offspring=8 'tokens_per_selection=[512,2048]'")
    parser.add_argument("--eval-sequences", type=int, default=32, help="held-out sequences of 256 tokens per corpus")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-root", default=os.path.join(os.path.dirname(__file__), "results", "sparse_db"),
                        help="one database per target is built under this directory and reused")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output and run the rest")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "sparsity.json"))
    parser.add_argument("--report", action="store_true", help="only print the table of an existing --output")
    args = parser.parse_args()
    if args.report:
        with open(args.output, encoding="utf-8") as handle:
            report(json.load(handle)["rows"])
        return
    dtype = getattr(torch, args.dtype)

    rows = []
    if args.resume and os.path.exists(args.output):
        with open(args.output, encoding="utf-8") as handle:
            rows = json.load(handle)["rows"]
    dense, tokenizer = load_default_model(dtype)
    held_out = HeldOut(dense, tokenizer, args.eval_sequences)
    if not any(row["search"] == "dense" for row in rows):
        rows.append({"target": 0.0, "search": "dense", **held_out.dense_perplexity})
    del dense

    overrides = parse_overrides(args.set)
    for target in args.targets:
        for search in args.searches:
            if any(row["target"] == target and row["search"] == search for row in rows):
                continue
            model, _ = load_default_model(dtype)
            config = EvoPressConfig(**{**dict(
                method="sparsity", target=target, search=search, preset="cpu", generations=args.generations,
                evaluation_tokens=0, seed=args.seed,
                database_dir=os.path.join(args.database_root, f"{target:g}")), **overrides})
            compressor = EvoPressCompressor(model, tokenizer)
            start = time.perf_counter()
            compressor.compress(config, progress=False)
            seconds = time.perf_counter() - start
            result = compressor.result
            sparsities = list(model.config.evopress["layer_sparsity"].values())
            row = {"target": target, "search": search, "average_sparsity": result.budget["average_sparsity"],
                   "search_seconds": result.timings["search"], "build_seconds": result.timings["build"],
                   "database_bytes": result.budget["database_bytes"], "total_seconds": seconds,
                   "layer_sparsity_range": [float(np.min(sparsities)), float(np.max(sparsities))],
                   "fitness": result.fitness, **held_out.measure(model)}
            if search == "evolution":
                row["generations"] = len(result.history) - 1
                row["levels"] = model.config.evopress["layer_sparsity"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "levels"}), flush=True)
            write(args, rows)
    verdict = report(rows)
    write(args, rows, verdict)
    print("wrote", args.output)


def report(rows: list) -> dict:
    """Prints the results as a Markdown table and says whether EvoPress beats every baseline."""
    print("\n| sparsity | search | Wikipedia ppl | Shakespeare ppl | Wikipedia KL | Shakespeare KL | layer range | "
          "search s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
    for row in rows:
        label = "0 (dense)" if row["search"] == "dense" else f"{row['target']:.0%}"
        spread = row.get("layer_sparsity_range")
        spread = f"{spread[0]:.0%}–{spread[1]:.0%}" if spread else ""
        print(f"| {label} | {row['search']} | {row['ppl_wikipedia']:.2f} | {row['ppl_shakespeare']:.2f} | "
              f"{row.get('kl_wikipedia', 0):.3f} | {row.get('kl_shakespeare', 0):.3f} | {spread} | "
              f"{row.get('search_seconds', 0):.0f} |")
    verdict = beats_every_baseline(rows)
    builds: dict[str, tuple[float, int]] = {}
    for r in rows:  # the first search at a target builds its database; later ones only open it
        if r["search"] != "dense":
            key = f"{r['target']:g}"
            builds[key] = max(builds.get(key, (0.0, 0)), (r["build_seconds"], r["database_bytes"]))
    for target, (seconds, size) in builds.items():
        print(f"database at {float(target):.0%}: built in {seconds:.0f} s, {size / 2**20:.0f} MiB")
    return verdict


def write(args: argparse.Namespace, rows: list, verdict: dict | None = None) -> None:
    write_json(args.output, {"rows": rows, "beats_every_baseline": verdict or {}, "settings": vars(args)})


if __name__ == "__main__":
    main()
