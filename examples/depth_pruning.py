"""Remove a quarter of SmolLM2-135M's blocks with EvoPress, save the model, and use it in a pipeline.

    python examples/depth_pruning.py --output smollm2-depth-25

Runs offline on a CPU in about 10 minutes (the `cpu` preset, the default here); on a GPU pass
`--preset paper` for the paper's settings.
"""

import argparse
import logging

import torch
from transformers import pipeline

from optimum_evopress import EvoPressCompressor, EvoPressConfig, evaluate_perplexity
from optimum_evopress.models import load_default_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", default="smollm2-depth-25")
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--granularity", default="block", choices=["block", "sublayer"])
    parser.add_argument("--preset", default="cpu", choices=["cpu", "paper"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    model, tokenizer = load_default_model(torch.bfloat16)
    config = EvoPressConfig(method="depth", target=args.target, granularity=args.granularity, preset=args.preset,
                            calibration_dataset="wikipedia")
    compressor = EvoPressCompressor(model, tokenizer)
    compressor.compress(config, save_dir=args.output, overwrite=True)

    removed = [unit for unit, level in compressor.result.levels.items() if level == "dropped"]
    print("removed:", ", ".join(removed))
    print("held-out Wikipedia perplexity:", compressor.result.perplexity)
    print("Shakespeare perplexity:", evaluate_perplexity(model, tokenizer, "shakespeare", num_tokens=8192))

    generator = pipeline("text-generation", model=args.output)
    print(generator("The French Revolution began", max_new_tokens=30, do_sample=False)[0]["generated_text"])


if __name__ == "__main__":
    main()
