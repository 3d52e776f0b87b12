"""What the benchmarks share: held-out evaluation against the dense model, `--set` overrides, JSON output."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import torch

from optimum_evopress import perplexity
from optimum_evopress.data import load_texts, tokenize_to_sequences
from optimum_evopress.fitness import FitnessEvaluator

CORPORA = ("wikipedia", "shakespeare")


class HeldOut:
    """Held-out sequences of every built-in corpus, with the dense model's perplexity and cached outputs for KL."""

    def __init__(self, dense: torch.nn.Module, tokenizer: Any, num_sequences: int, sequence_length: int = 256):
        self.sequences = {name: tokenize_to_sequences(load_texts(name, "evaluation"), tokenizer,
                                                      sequence_length)[:num_sequences] for name in CORPORA}
        self.dense_perplexity = {f"ppl_{name}": perplexity(dense, seqs, progress=False)
                                 for name, seqs in self.sequences.items()}
        self.references = {}
        for name, seqs in self.sequences.items():
            self.references[name] = FitnessEvaluator(dense, seqs, "kl", batch_size=8)
            self.references[name].cache_teacher(progress=False)

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """Perplexity and KL divergence to the dense model on every corpus."""
        row = {}
        for name, seqs in self.sequences.items():
            row[f"ppl_{name}"] = perplexity(model, seqs, progress=False)
            self.references[name].model = model
            row[f"kl_{name}"] = self.references[name].score([(i, seqs.shape[1]) for i in range(len(seqs))])
        return row


def beats_every_baseline(rows: list[dict[str, Any]], case_key: str = "target") -> dict[str, dict[str, bool]]:
    """Per case and corpus: whether the `evolution` row has a lower held-out perplexity than every other
    search of that case (dense rows are not a search). Printed, and returned for the JSON."""
    verdict = {}
    cases = dict.fromkeys(row[case_key] for row in rows if row["search"] != "dense")
    for case in cases:
        searches = {r["search"]: r for r in rows if r[case_key] == case and r["search"] != "dense"}
        evo = searches.pop("evolution", None)
        if evo is not None and searches:
            label = f"{case:g}" if isinstance(case, float) else str(case)
            verdict[label] = {name: all(evo[f"ppl_{name}"] < r[f"ppl_{name}"] for r in searches.values())
                              for name in CORPORA}
    print("\nEvoPress has the lowest held-out perplexity of all searches:", json.dumps(verdict))
    return verdict


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set FIELD=JSON ...` as EvoPressConfig keyword arguments."""
    return {key: json.loads(value) for key, value in (item.split("=", 1) for item in items)}


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Writes `payload` plus a description of the machine to `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    machine = {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({**payload, "machine": machine}, handle, indent=2)
