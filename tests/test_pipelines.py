"""Compressed models inside transformers pipelines: from a saved directory and in memory, every method."""

import pytest
import torch
from transformers import pipeline

from conftest import corpus, make_model
from optimum_evopress import EvoPressCompressor, EvoPressConfig

SMALL = dict(calibration_dataset=corpus(), sequence_length=32, calibration_tokens=512, evaluation_tokens=0,
             generations=2, offspring=4, survivors_per_selection=[2, 1], tokens_per_selection=[64, 256],
             initial_candidates=2)
METHODS = {
    "depth": dict(method="depth", target=0.25),
    "quantization": dict(method="quantization", target=3.0, bits=[2, 3, 4], group_size=16),
    "sparsity": dict(method="sparsity", target=0.5, sparsity_levels=2),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_text_generation_pipeline_from_the_saved_directory_and_from_memory(method, tokenizer, tmp_path):
    compressor = EvoPressCompressor(make_model(num_layers=4), tokenizer)
    compressed = compressor.compress(EvoPressConfig(**METHODS[method], **SMALL), progress=False,
                                     save_dir=tmp_path / "out")
    prompt = "The quick brown fox"
    from_disk = pipeline("text-generation", model=str(tmp_path / "out"))
    in_memory = pipeline("text-generation", model=compressed, tokenizer=tokenizer)
    settings = dict(max_new_tokens=8, do_sample=False)
    generated = [p(prompt, **settings)[0]["generated_text"] for p in (from_disk, in_memory)]
    assert generated[0] == generated[1] and generated[0].startswith(prompt)
    # the pipeline runs the compressed model, not a dense copy
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(from_disk.model(ids).logits, compressed(ids).logits)
