"""Quantize SmolLM2-135M to 3 bits on average, every linear layer at its own GPTQ bit-width.

    python examples/mixed_precision_gptq.py --output smollm2-3bit

Builds the GPTQ database once (about 2 minutes on 2 CPU cores) in `--database-dir`, so later runs at
other targets reuse it, searches with the `cpu` preset (about 17 minutes), saves a compressed-tensors
checkpoint, reloads it with plain transformers in a pipeline, and writes the per-layer bit-widths in
the reference implementation's text format.
"""

import argparse
import logging
import os
from collections import Counter

import torch
from transformers import pipeline

from optimum_evopress import EvoPressCompressor, EvoPressConfig, evaluate_perplexity, write_levels_file
from optimum_evopress.models import load_default_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="smollm2-3bit")
    parser.add_argument("--target", type=float, default=3.0)
    parser.add_argument("--granularity", default="linear", choices=["linear", "fused", "block"])
    parser.add_argument("--database-dir", default="smollm2-gptq-db")
    parser.add_argument("--preset", default="cpu", choices=["cpu", "paper"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    model, tokenizer = load_default_model(torch.bfloat16)
    config = EvoPressConfig(method="quantization", target=args.target, bits=[2, 3, 4, 5, 6, 8], group_size=64,
                            granularity=args.granularity, preset=args.preset, database_dir=args.database_dir)
    compressor = EvoPressCompressor(model, tokenizer)
    compressor.compress(config, save_dir=args.output, overwrite=True)

    layer_bits = model.config.evopress["layer_bits"]
    print("average bits:", compressor.result.budget["average_bits"])
    print("layers per bit-width:", dict(sorted(Counter(layer_bits.values()).items())))
    print("held-out Wikipedia perplexity:", compressor.result.perplexity)
    print("Shakespeare perplexity:", evaluate_perplexity(model, tokenizer, "shakespeare", num_tokens=8192))
    write_levels_file(layer_bits, os.path.join(args.output, "layer_bits.txt"))

    generator = pipeline("text-generation", model=args.output)  # plain transformers + compressed-tensors
    print(generator("The French Revolution began", max_new_tokens=30, do_sample=False)[0]["generated_text"])


if __name__ == "__main__":
    main()
