"""Prune SmolLM2-135M to 60% unstructured sparsity, every linear layer at its own SparseGPT sparsity.

    python examples/unstructured_sparsity.py --output smollm2-sparse-60

Builds the SparseGPT database once in `--database-dir` (17 levels per layer around the target),
compares EvoPress with OWL on held-out text, saves the EvoPress model as a standard checkpoint with
exact zeros, and reloads it with plain transformers in a pipeline. float32: bfloat16 matmuls are
far slower than float32 on CPUs without native bf16.
"""

import argparse
import logging

import torch
from transformers import pipeline

from optimum_evopress import EvoPressCompressor, EvoPressConfig, evaluate_perplexity
from optimum_evopress.models import load_default_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="smollm2-sparse-60")
    parser.add_argument("--target", type=float, default=0.6)
    parser.add_argument("--database-dir", default="smollm2-sparse-db")
    parser.add_argument("--preset", default="cpu", choices=["cpu", "paper"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    for search in ("owl", "evolution"):  # OWL first; the database built for it serves EvoPress too
        model, tokenizer = load_default_model(torch.float32)
        config = EvoPressConfig(method="sparsity", target=args.target, search=search, preset=args.preset,
                                database_dir=f"{args.database_dir}-{args.target:g}")
        compressor = EvoPressCompressor(model, tokenizer)
        compressor.compress(config, save_dir=args.output if search == "evolution" else None, overwrite=True)
        sparsity = model.config.evopress["layer_sparsity"]
        print(f"{search}: average sparsity {compressor.result.budget['average_sparsity']:.4f}, layers from "
              f"{min(sparsity.values()):.1%} to {max(sparsity.values()):.1%}")
        print(f"{search}: held-out Wikipedia perplexity {compressor.result.perplexity}, Shakespeare "
              f"{evaluate_perplexity(model, tokenizer, 'shakespeare', num_tokens=8192):.2f}")

    generator = pipeline("text-generation", model=args.output)  # plain transformers, no import of ours
    print(generator("The French Revolution began", max_new_tokens=30, do_sample=False)[0]["generated_text"])


if __name__ == "__main__":
    main()
