"""Depth pruning on SmolLM2-135M: EvoPress against every baseline, at the same budget and on the same data.

Calibration: the built-in Wikipedia corpus (calibration articles). Evaluation: perplexity and KL to
the dense model on held-out Wikipedia articles and on Shakespeare plays never used for calibration.
Brute force is left out: removing 8 of 30 blocks alone has 5.8 million assignments.

    python benchmarks/depth.py                      # full table (about an hour on 2 CPU cores)
    python benchmarks/depth.py --cases block:0.25   # one case

Prints a table and writes JSON (default benchmarks/results/depth.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from common import HeldOut, beats_every_baseline, parse_overrides, write_json

from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.models import load_default_model

SEARCHES = ("evolution", "shortgpt", "sliding_window", "one_at_a_time", "random")
CASES = ("block:0.25", "block:0.5", "sublayer:0.25", "sublayer:0.5")
# Removing 8 of 30 blocks, good candidates differ little: a 2,048-token final stage on 8,192 calibration
# tokens could not tell them apart reliably, so this case (all its searches) reads twice the data.
CASE_SETTINGS = {"block:0.25": {"calibration_tokens": 16384, "tokens_per_selection": [256, 4096]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="granularity:target pairs")
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES))
    parser.add_argument("--generations", nargs="*", default=["block:0.25=100", "block:0.5=100", "sublayer:0.25=100",
                                                              "sublayer:0.5=100"], metavar="CASE=N",
                        help="generations per case (the cpu preset caps them at 40 for the 10-minute main command)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                        help="override EvoPressConfig fields, e.g. --set offspring=8 'tokens_per_selection=[512,2048]'")
    parser.add_argument("--eval-sequences", type=int, default=32, help="held-out sequences of 256 tokens per corpus")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output and run the rest")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "depth.json"))
    parser.add_argument("--report", action="store_true", help="only print the tables of an existing --output")
    args = parser.parse_args()
    if args.report:
        with open(args.output, encoding="utf-8") as handle:
            report(json.load(handle)["rows"])
        return
    dtype = getattr(torch, args.dtype)
    generations = {case: int(n) for case, n in (item.split("=") for item in args.generations)}

    dense, tokenizer = load_default_model(dtype)
    held_out = HeldOut(dense, tokenizer, args.eval_sequences)
    rows = [{"case": "dense", "search": "-", **held_out.dense_perplexity}]
    del dense

    if args.resume and os.path.exists(args.output):
        with open(args.output, encoding="utf-8") as handle:
            rows += [row for row in json.load(handle)["rows"] if row["case"] != "dense"]
    for case in args.cases:
        granularity, target = case.split(":")
        for search in args.searches:
            if any(row["case"] == case and row["search"] == search for row in rows):
                continue
            model, _ = load_default_model(dtype)
            overrides = parse_overrides(args.set)
            config = EvoPressConfig(**{**dict(method="depth", target=float(target), granularity=granularity,
                                              search=search, preset="cpu", generations=generations.get(case),
                                              evaluation_tokens=0, seed=args.seed),
                                       **CASE_SETTINGS.get(case, {}), **overrides})
            compressor = EvoPressCompressor(model, tokenizer)
            start = time.perf_counter()
            compressor.compress(config, progress=False)
            seconds = time.perf_counter() - start
            result = compressor.result
            row = {"case": case, "search": search, "search_seconds": result.timings["search"],
                   "total_seconds": seconds,
                   "dropped": [unit for unit, level in result.levels.items() if level == "dropped"],
                   **held_out.measure(model)}
            if search == "evolution":
                t = result.timings
                done = len(result.history) - 1
                other = t["search"] - t["search_forward"] - t["search_fitness"] - t["search_swap"]
                row["generation"] = {
                    "generations": done,
                    "seconds_per_generation": t["search"] / max(done, 1),
                    "forward_share": t["search_forward"] / t["search"],
                    "fitness_arithmetic_share": t["search_fitness"] / t["search"],
                    "swap_share": t["search_swap"] / t["search"],
                    "engine_share": other / t["search"],
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args, rows, {})

    verdict = report(rows)
    write(args, rows, verdict)
    print("wrote", args.output)


def report(rows: list) -> dict:
    """Prints the results as a Markdown table and says whether EvoPress beats every baseline."""
    print("\n| case | search | Wikipedia ppl | Shakespeare ppl | Wikipedia KL | Shakespeare KL | search s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['case']} | {row['search']} | {row['ppl_wikipedia']:.2f} | {row['ppl_shakespeare']:.2f} | "
              f"{row.get('kl_wikipedia', 0):.3f} | {row.get('kl_shakespeare', 0):.3f} | "
              f"{row.get('search_seconds', 0):.0f} |")
    verdict = beats_every_baseline(rows, "case")
    for row in rows:
        if "generation" in row:
            g = row["generation"]
            print(f"{row['case']}: {g['generations']} generations, {g['seconds_per_generation']:.1f} s each: forward "
                  f"passes {g['forward_share']:.1%}, fitness arithmetic {g['fitness_arithmetic_share']:.1%}, swaps "
                  f"{g['swap_share']:.2%}, search engine {g['engine_share']:.2%}")
    return verdict


def write(args: argparse.Namespace, rows: list, verdict: dict) -> None:
    write_json(args.output, {"rows": rows, "beats_every_baseline": verdict, "settings": vars(args)})


if __name__ == "__main__":
    main()
