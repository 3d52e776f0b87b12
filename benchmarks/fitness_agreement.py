"""Do the cheaper fitnesses rank candidates as the full KL divergence does?

On SmolLM2-135M (float32, cpu preset data) every candidate of two pools is scored with `kl`, `topk_kl`
and `topk_kl_renormalized` on the same calibration tokens (the cpu preset's final stage, 2,048):

- `random`: random assignments at the budget (what a first generation compares);
- `neighbours`: offspring of one parent, 1 to 3 level switches away (what selection compares later).

Per method, pool and fitness: Spearman's rank correlation with `kl`, the share of candidate pairs put in the
same order as `kl`, whether the best candidate is the same, and the seconds per candidate. The row
`kl, other tokens` scores `kl` on as many other calibration tokens: how far `kl` agrees with itself across
minibatches, the noise every selection stage lives with. Prints a table,
writes JSON (default benchmarks/results/fitness_agreement.json).

    python benchmarks/fitness_agreement.py
    python benchmarks/fitness_agreement.py --methods depth --candidates 12
"""

from __future__ import annotations

import argparse
import itertools
import os

import numpy as np
import torch
from common import write_json

from optimum_evopress import EvoPressConfig
from optimum_evopress.data import prepare_token_data
from optimum_evopress.fitness import FitnessEvaluator
from optimum_evopress.methods import get_method_class
from optimum_evopress.models import load_default_model
from optimum_evopress.search.space import level_switch_mutation

METHODS = {"depth": 0.25, "sparsity": 0.6}
KINDS = ("kl", "topk_kl", "topk_kl_renormalized")
OTHER_TOKENS = "kl, other tokens"


def ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)


def agreement(values: list[float], reference: list[float]) -> dict[str, float]:
    spearman = float(np.corrcoef(ranks(values), ranks(reference))[0, 1])
    pairs = list(itertools.combinations(range(len(values)), 2))
    same = sum((values[i] - values[j]) * (reference[i] - reference[j]) > 0 for i, j in pairs)
    return {"spearman": spearman, "pair_agreement": same / len(pairs),
            "same_best": int(np.argmin(values)) == int(np.argmin(reference))}


def pools(space, count: int, rng: np.random.Generator) -> dict[str, list[tuple[int, ...]]]:
    parent = space.random_assignment(rng)
    neighbours = [level_switch_mutation(space, parent, rng, flips=int(rng.integers(1, 4))) for _ in range(count)]
    return {"random": [space.random_assignment(rng) for _ in range(count)], "neighbours": neighbours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--candidates", type=int, default=20, help="candidates per pool")
    parser.add_argument("--tokens", type=int, default=2048,
                        help="calibration tokens each candidate is scored on (whole sequences)")
    parser.add_argument("--topk", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database-root", default=os.path.join(os.path.dirname(__file__), "results", "speed_db"))
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results",
                                                         "fitness_agreement.json"))
    args = parser.parse_args()

    model, tokenizer = load_default_model(torch.float32)
    model.eval()
    rows = []
    for name in args.methods:
        settings = dict(method=name, target=METHODS[name], preset="cpu", seed=args.seed)
        if name != "depth":  # the database benchmarks/search_speed.py builds (or reads)
            settings["database_dir"] = os.path.join(args.database_root, f"{name}-float32")
        config = EvoPressConfig(**settings)
        method_cls = get_method_class(name)
        method = method_cls(model, config)
        space = method.level_space()
        resolved = config.resolved_search_settings(method_cls.default_settings(config.preset, space))
        length, calibration_tokens = resolved["sequence_length"], resolved["calibration_tokens"]
        count = args.tokens // length
        if not 0 < 2 * count * length <= calibration_tokens:
            raise ValueError(f"--tokens: whole sequences of {length}, at most half the calibration set "
                             f"({calibration_tokens // 2}), got {args.tokens}")
        data = prepare_token_data(config.calibration_dataset, tokenizer, length, calibration_tokens, seed=args.seed)
        method.build(data.calibration, progress=False)
        batch = [(i, length) for i in range(count)]
        other_batch = [(count + i, length) for i in range(count)]
        candidates = pools(space, args.candidates, np.random.default_rng(args.seed))
        scores = {pool: {} for pool in candidates}
        seconds = {pool: {} for pool in candidates}
        for label, kind, tokens in [(kind, kind, batch) for kind in KINDS] + [(OTHER_TOKENS, "kl", other_batch)]:
            method.reset()
            evaluator = FitnessEvaluator(model, data.calibration[:2 * count], kind, args.topk, batch_size=8)
            evaluator.cache_teacher(progress=False)
            for pool, assignments in candidates.items():
                evaluator.forward_seconds = evaluator.metric_seconds = 0.0
                scores[pool][label] = []
                for assignment in assignments:
                    method.set_levels(assignment)
                    scores[pool][label].append(evaluator.score(tokens))
                seconds[pool][label] = (evaluator.forward_seconds + evaluator.metric_seconds) / len(assignments)
        method.reset()
        for pool in candidates:
            for kind in (*KINDS, OTHER_TOKENS):
                values = scores[pool][kind]
                rows.append({"method": name, "pool": pool, "fitness": kind, "scores": values,
                             "seconds_per_candidate": seconds[pool][kind], **agreement(values, scores[pool]["kl"])})
                print(f"{name:>9} {pool:>10} {kind:>21}: spearman {rows[-1]['spearman']:.3f}, "
                      f"{seconds[pool][kind]:.2f} s/candidate", flush=True)

    print("\n| method | pool | fitness | Spearman with kl | pairs ordered as kl | same best | s / candidate "
          "| time / kl |")
    print("| --- | --- | --- | ---: | ---: | --- | ---: | ---: |")
    for row in rows:
        reference = next(r for r in rows if r["method"] == row["method"] and r["pool"] == row["pool"]
                         and r["fitness"] == "kl")
        row["time_over_kl"] = row["seconds_per_candidate"] / reference["seconds_per_candidate"]
        print(f"| {row['method']} | {row['pool']} | {row['fitness']} | {row['spearman']:.3f} | "
              f"{100 * row['pair_agreement']:.1f}% | {'yes' if row['same_best'] else 'no'} | "
              f"{row['seconds_per_candidate']:.2f} | {row['time_over_kl']:.2f}x |")
    write_json(args.output, {"rows": rows, "settings": vars(args)})


if __name__ == "__main__":
    main()
