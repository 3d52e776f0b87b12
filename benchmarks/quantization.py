"""Mixed-precision GPTQ on SmolLM2-135M: EvoPress against uniform, dynamic programming and random, on one database.

Calibration: the built-in Wikipedia corpus (calibration articles). Evaluation: perplexity and KL to
the dense model on held-out Wikipedia articles and on Shakespeare plays never used for calibration.
SmolLM2's weights are dequantized 4-bit already, so the targets are 2.5 and 3.0 average bits.
Every search reads the same GPTQ database (bits 2, 3, 4, 5, 6, 8; symmetric, group size 64).

    python benchmarks/quantization.py                    # full table (about an hour on 2 CPU cores)
    python benchmarks/quantization.py --targets 3.0      # one target

Also reports the database build time for all bit-widths against one bit-width (shared Hessians and
factorisations). Prints a table and writes JSON (default benchmarks/results/quantization.json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter

import torch
from common import HeldOut, beats_every_baseline, parse_overrides, write_json

from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.data import prepare_token_data
from optimum_evopress.methods.quantization import Quantization
from optimum_evopress.models import load_default_model

SEARCHES = ("evolution", "dynamic_programming", "uniform", "random")
BITS = [2, 3, 4, 5, 6, 8]


def time_database(args, dtype) -> dict:
    """Seconds to build the database for all bit-widths and for one (3 bits), each from scratch."""
    seconds = {}
    for label, bits in (("all", BITS), ("one", [3])):
        model, tokenizer = load_default_model(dtype)
        config = EvoPressConfig(method="quantization", target=3.0, bits=BITS, group_size=args.group_size,
                                preset="cpu", seed=args.seed)
        data = prepare_token_data("wikipedia", tokenizer, 256, 8192, 0, seed=args.seed)
        method = Quantization(model, config)
        method.bits = bits  # the solver accepts any list; one bit-width is the reference cost
        with tempfile.TemporaryDirectory() as directory:
            method.config.database_dir = directory
            start = time.perf_counter()
            with torch.no_grad():
                method.build(data.calibration, progress=False)
            seconds[label] = time.perf_counter() - start
            seconds[f"{label}_bytes"] = method.database.size_bytes
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", type=float, default=[2.5, 3.0])
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES))
    parser.add_argument("--generations", type=int, default=None, help="default: the cpu preset's")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                        help="override EvoPressConfig fields, e.g. --set offspring=8 'tokens_per_selection=[512,2048]'")
    parser.add_argument("--eval-sequences", type=int, default=32, help="held-out sequences of 256 tokens per corpus")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-dir", default=os.path.join(os.path.dirname(__file__), "results", "quant_db"))
    parser.add_argument("--skip-build-timing", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output and run the rest")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "quantization.json"))
    parser.add_argument("--report", action="store_true", help="only print the tables of an existing --output")
    args = parser.parse_args()
    if args.report:
        with open(args.output, encoding="utf-8") as handle:
            saved = json.load(handle)
        report(saved["rows"], saved.get("database", {}))
        return
    dtype = getattr(torch, args.dtype)

    rows, database = [], {}
    if args.resume and os.path.exists(args.output):
        with open(args.output, encoding="utf-8") as handle:
            saved = json.load(handle)
        rows, database = saved["rows"], saved.get("database", {})
    if not args.skip_build_timing and "all" not in database:
        database.update(time_database(args, dtype))
        write(args, rows, database)

    dense, tokenizer = load_default_model(dtype)
    held_out = HeldOut(dense, tokenizer, args.eval_sequences)
    if not any(row["search"] == "dense" for row in rows):
        rows.append({"target": 16, "search": "dense", **held_out.dense_perplexity})
    del dense

    overrides = parse_overrides(args.set)
    for target in args.targets:
        for search in args.searches:
            if search == "uniform" and target != int(target):
                continue
            if any(row["target"] == target and row["search"] == search for row in rows):
                continue
            model, _ = load_default_model(dtype)
            config = EvoPressConfig(**{**dict(
                method="quantization", target=target, bits=BITS, group_size=args.group_size, search=search,
                preset="cpu", generations=args.generations, evaluation_tokens=0, seed=args.seed,
                database_dir=args.database_dir), **overrides})
            compressor = EvoPressCompressor(model, tokenizer)
            start = time.perf_counter()
            compressor.compress(config, progress=False)
            seconds = time.perf_counter() - start
            result = compressor.result
            row = {"target": target, "search": search, "average_bits": result.budget["average_bits"],
                   "search_seconds": result.timings["search"], "build_seconds": result.timings["build"],
                   "total_seconds": seconds, "bits_histogram": _histogram(model.config.evopress["layer_bits"]),
                   **held_out.measure(model)}
            if search == "evolution":
                row["generations"] = len(result.history) - 1
                row["levels"] = model.config.evopress["layer_bits"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "levels"}), flush=True)
            write(args, rows, database)
    verdict = report(rows, database)
    write(args, rows, database, verdict)
    print("wrote", args.output)


def _histogram(layer_bits: dict) -> dict:
    return {str(bits): count for bits, count in sorted(Counter(layer_bits.values()).items())}


def report(rows: list, database: dict) -> dict:
    """Prints the results as a Markdown table and says whether EvoPress beats every baseline."""
    print("\n| avg bits | search | Wikipedia ppl | Shakespeare ppl | Wikipedia KL | Shakespeare KL | search s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        label = "16 (dense)" if row["search"] == "dense" else f"{row['target']:g}"
        print(f"| {label} | {row['search']} | {row['ppl_wikipedia']:.2f} | {row['ppl_shakespeare']:.2f} | "
              f"{row.get('kl_wikipedia', 0):.3f} | {row.get('kl_shakespeare', 0):.3f} | "
              f"{row.get('search_seconds', 0):.0f} |")
    verdict = beats_every_baseline(rows)
    if "all" in database:
        print(f"database build: all {len(BITS)} bit-widths {database['all']:.0f} s "
              f"({database['all_bytes'] / 2**20:.0f} MiB) vs one bit-width {database['one']:.0f} s: "
              f"{database['all'] / database['one']:.2f}x the time for {len(BITS)}x the variants")
    return verdict


def write(args: argparse.Namespace, rows: list, database: dict, verdict: dict | None = None) -> None:
    write_json(args.output, {"rows": rows, "database": database, "beats_every_baseline": verdict or {},
                             "settings": vars(args)})


if __name__ == "__main__":
    main()
