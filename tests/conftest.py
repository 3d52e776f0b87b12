"""Tiny models and a tiny tokenizer built by the tests themselves: no download, seconds to make."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. "
    "Knowledge is power, and power corrupts; the pen is mightier than the sword. "
) * 4


def corpus(num_documents: int = 40) -> list[str]:
    """Distinct small documents for calibration and evaluation."""
    return [f"Document {i}. " + TEXT[(i * 37) % 200:] + f" It ends with number {i * 7}." for i in range(num_documents)]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_tokenizer():
    """A byte-level BPE tokenizer (vocabulary 160) trained on `corpus()`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer)
    from tokenizers import decoders

    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<eos>")


def make_model(model_type: str = "llama", num_layers: int = 6, vocab_size: int = 320, seed: int = 0, **overrides):
    """A randomly initialised decoder of `model_type` with hidden size 32 (unless `overrides` say otherwise)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256, head_dim=8,
                  pad_token_id=1, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False)
    kwargs.update(overrides)
    if model_type == "gemma3_text":
        kwargs.update(sliding_window=16, query_pre_attn_scalar=8)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Larger weights than the default init make blocks matter, so searches have something to find.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.normal_(0, 0.15)
    return model.eval()


def with_scaled_logits(model):
    """`model` whose logits are scaled after the output head (a logit scale the head does not apply)."""
    plain_forward = type(model).forward

    def scaled_forward(self, *args, **kwargs):
        out = plain_forward(self, *args, **kwargs)
        out.logits = out.logits * 3
        return out

    model.forward = scaled_forward.__get__(model)
    return model


def disk_offload_map(offloaded, num_layers: int = 6) -> dict[str, str]:
    """A `device_map` for `make_model` that offloads the blocks in `offloaded` to disk and keeps the rest on the CPU."""
    return {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
            **{f"model.layers.{i}": "disk" if i in offloaded else "cpu" for i in range(num_layers)}}


def input_ids():
    """A fixed batch of token ids for comparing logits (vocabulary 320, as `make_model`)."""
    return torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


@pytest.fixture
def tiny_model():
    return make_model()


_RELOAD_SCRIPT = r"""
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
out = {}
for path in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out[path] = {
            "logits": model(input_ids=ids).logits,
            "generated": model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, use_cache=True,
                                        pad_token_id=model.config.pad_token_id),
            "num_hidden_layers": model.config.num_hidden_layers,
        }
assert "optimum_evopress" not in sys.modules
torch.save(out, sys.argv[2])
"""


def reload_in_fresh_process(paths, input_ids, tmp_path):
    """Loads each checkpoint with plain transformers in a new Python process that never imports
    optimum_evopress; returns its logits on `input_ids` and a greedy generation with the KV cache."""
    import subprocess
    import sys

    ids_file, out_file = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(input_ids, ids_file)
    subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, str(ids_file), str(out_file), *map(str, paths)],
                   check=True, cwd=tmp_path)
    return torch.load(out_file)
