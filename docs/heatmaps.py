"""Draws the level heat maps in docs/images from the benchmarks' EvoPress rows (docs/*_benchmark.json).

    python docs/heatmaps.py
"""

import json
import os

from optimum_evopress.model_card import save_heatmap

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    os.makedirs(os.path.join(HERE, "images"), exist_ok=True)
    for method, key, budget_key, target in (("quantization", "layer_bits", "average_bits", 3.0),
                                            ("sparsity", "layer_sparsity", "average_sparsity", 0.7)):
        with open(os.path.join(HERE, f"{method}_benchmark.json"), encoding="utf-8") as handle:
            rows = json.load(handle)["rows"]
        row = next(r for r in rows if r["search"] == "evolution" and r["target"] == target)
        levels = row["levels"]
        record = {"config": {"method": method, "target": target}, key: levels,
                  "budget": {budget_key: row[budget_key]}}
        path = os.path.join(HERE, "images", f"smollm2_{method}_{target:g}.png")
        save_heatmap(record, path)
        print("wrote", path)


if __name__ == "__main__":
    main()
