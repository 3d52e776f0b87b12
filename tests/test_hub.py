"""push_to_hub against a Hub-compatible server on 127.0.0.1, loading back from it, and the model card."""

import json
import os
import subprocess
import sys

import huggingface_hub
import pytest
import torch

from conftest import corpus, input_ids, logits, make_model
from hub_server import HubServer
from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.hub import HubPushError, load_compressed, push_checkpoint

TOKEN = "hf_evopress_test_token"
TESTS = os.path.dirname(os.path.abspath(__file__))


def quant_config(**overrides):
    settings = dict(method="quantization", target=2.5, bits=[2, 3, 4], group_size=16, calibration_dataset=corpus(),
                    generations=2, offspring=4, survivors_per_selection=[2, 1], tokens_per_selection=[64, 256],
                    calibration_tokens=512, sequence_length=32, evaluation_tokens=128, initial_candidates=2)
    settings.update(overrides)
    return EvoPressConfig(**settings)


@pytest.fixture
def hub():
    server = HubServer(TOKEN).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """A compressed tiny model, its compressor and its saved checkpoint."""
    compressor = EvoPressCompressor(make_model(num_layers=3), tokenizer)
    compressed = compressor.compress(quant_config(), progress=False)
    directory = tmp_path_factory.mktemp("saved") / "checkpoint"
    compressor.save_pretrained(directory)
    return compressor, compressed, directory


_PUSH_AND_PULL = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import corpus, input_ids, make_model, make_tokenizer
from test_hub import quant_config
from optimum_evopress import EvoPressCompressor
from optimum_evopress.hub import load_compressed
from transformers import AutoModelForCausalLM, pipeline

compressor = EvoPressCompressor(make_model(num_layers=3), make_tokenizer())
compressed = compressor.compress(quant_config(), progress=False)
with torch.no_grad():
    expected = compressed(input_ids=input_ids()).logits
url = compressed.push_to_hub("tester/tiny-evopress", commit_message="first push")
reloaded = AutoModelForCausalLM.from_pretrained("tester/tiny-evopress")
with torch.no_grad():
    got = reloaded(input_ids=input_ids()).logits
model, record = load_compressed("tester/tiny-evopress")
generator = pipeline("text-generation", model="tester/tiny-evopress")
text = generator("The quick brown fox", max_new_tokens=5, do_sample=False)[0]["generated_text"]
json.dump({"url": url, "exact": bool(torch.equal(got, expected)), "levels_match": record["levels"] == compressor.result.levels,
           "loaded_type": type(model).__name__, "text": text, "layer_bits": compressed.config.evopress["layer_bits"]},
          open(sys.argv[2], "w"))
"""


def test_push_to_hub_uploads_a_checkpoint_that_loads_back_from_the_hub(hub, tmp_path):
    out = tmp_path / "out.json"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    subprocess.run([sys.executable, "-c", _PUSH_AND_PULL, TESTS, str(out)], check=True, env=env, cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["exact"] and result["levels_match"] and result["loaded_type"] == "LlamaForCausalLM"
    assert result["text"].startswith("The quick brown fox")
    assert result["url"].startswith(hub.url + "/tester/tiny-evopress/commit/")

    # one commit, holding everything a user needs
    assert [c["summary"] for c in hub.commits] == ["first push"]
    files = hub.repos["tester/tiny-evopress"]["files"]
    assert {"config.json", "model.safetensors", "evopress_config.json", "README.md", "evopress_levels.png",
            "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert files["evopress_levels.png"].startswith(b"\x89PNG")
    card = huggingface_hub.ModelCard(files["README.md"].decode())
    assert {"evopress", "quantization", "compressed-tensors"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert 'pipeline("text-generation", model="tester/tiny-evopress")' in card.text
    # the level table: one row per block, one column per projection, the bits the model has
    rows = [line for line in card.text.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")
            or line.startswith("| 2 |")]
    assert len(rows) == 3
    bits = result["layer_bits"]
    assert rows[1].split("|")[1:-1] == [" 1 "] + [f" {bits[f'model.layers.1.{p}']} " for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]


def test_pushing_a_saved_directory_writes_the_card_for_the_repo_and_leaves_the_directory_alone(saved, hub,
                                                                                               monkeypatch):
    _, _, directory = saved
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    before = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    push_checkpoint(directory, "tester/from-dir", token=TOKEN, private=True)
    assert {name: (directory / name).read_bytes() for name in os.listdir(directory)} == before
    repo = hub.repos["tester/from-dir"]
    assert repo["private"]
    assert set(before) == set(repo["files"])
    assert 'model="tester/from-dir"' in repo["files"]["README.md"].decode()
    assert all(repo["files"][name] == before[name] for name in before if name != "README.md")


@pytest.mark.parametrize("repo_id, token, message", [
    ("not a repo id!", TOKEN, "repo_id 'not a repo id!' is not a valid Hub repo id"),
    ("a/b/c", TOKEN, "repo_id must be 'name' or 'namespace/name'"),
    ("tester/ok", None, "no Hub token"),
])
def test_bad_repo_id_or_missing_token_fail_before_anything_is_written(saved, hub, monkeypatch, tmp_path, repo_id,
                                                                      token, message):
    compressor, _, directory = saved
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(compressor, "save_pretrained", lambda *a, **k: pytest.fail("saved before checking"))
    with pytest.raises(ValueError, match=message):
        compressor.push_to_hub(repo_id, token=token)
    with pytest.raises(ValueError, match=message):
        push_checkpoint(directory, repo_id, token=token)
    assert hub.repos == {} and hub.commits == []


def test_a_rejected_token_or_an_unreachable_hub_is_a_clear_error_and_nothing_is_committed(saved, hub, monkeypatch):
    _, _, directory = saved
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    with pytest.raises(HubPushError, match="could not push to 'tester/x' at .*: the token was refused \\(HTTP 401\\).*nothing was committed"):
        push_checkpoint(directory, "tester/x", token="hf_wrong")
    assert hub.repos == {} and hub.commits == []

    unreachable = HubServer(TOKEN)  # bound, then closed: nothing listens on its port
    unreachable.stop()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", unreachable.url)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(HubPushError, match=f"could not push to 'tester/x' at {unreachable.url}"):
        push_checkpoint(directory, "tester/x", token=TOKEN)


def test_pushing_a_directory_that_is_not_an_evopress_checkpoint_is_refused(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    make_model(num_layers=2).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not an EvoPress checkpoint: evopress_config.json missing"):
        push_checkpoint(tmp_path / "plain", "tester/x", token=TOKEN)
    with pytest.raises(ValueError, match="is not a directory"):
        push_checkpoint(tmp_path / "missing", "tester/x", token=TOKEN)
    assert hub.repos == {}


def test_push_before_compress_is_refused(tokenizer):
    with pytest.raises(ValueError, match="call compress"):
        EvoPressCompressor(make_model(num_layers=2), tokenizer).push_to_hub("tester/x", token=TOKEN)


def test_load_compressed_returns_the_model_and_its_search_record(saved):
    compressor, compressed, directory = saved
    model, record = load_compressed(directory)
    assert torch.equal(logits(model), logits(compressed))
    assert record["levels"] == compressor.result.levels
    assert EvoPressConfig.from_dict(record["config"]) == compressor.config
    assert record["perplexity"] == compressor.result.perplexity and record["budget"] == compressor.result.budget


def test_the_card_works_without_matplotlib(saved, tmp_path, monkeypatch):
    compressor, _, _ = saved
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    compressor.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "evopress_levels.png").exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "evopress_levels.png" not in card and "| block | q_proj |" in card
    assert f"average **{compressor.result.budget['average_bits']:.4f} bits**" in card


def test_the_model_card_shows_the_budget_perplexity_and_a_config_that_rebuilds(saved):
    compressor, _, directory = saved
    card = huggingface_hub.ModelCard.load(directory / "README.md")
    text = card.text
    result = compressor.result
    assert f"dense {result.perplexity['dense']:.2f} → compressed {result.perplexity['compressed']:.2f}" in text
    assert f"{result.fitness:.4f}" in text
    code = text.split("config = EvoPressConfig(")[1].split("\n)")[0]
    rebuilt = eval(f"dict({code})")  # the card's arguments are Python literals
    assert EvoPressConfig(**{**rebuilt, "calibration_dataset": corpus()}) == compressor.config
    assert "the calibration data was 40 texts given in memory" in text


def test_apply_rebuilds_the_saved_model_from_its_checkpoint_without_searching(saved, tokenizer, monkeypatch):
    compressor, compressed, directory = saved
    import optimum_evopress.compressor as compressor_module

    monkeypatch.setattr(compressor_module, "evolutionary_search", lambda *a, **k: pytest.fail("searched"))
    again = EvoPressCompressor(make_model(num_layers=3), tokenizer)
    rebuilt = again.apply(directory, progress=False)
    assert again.result.levels == compressor.result.levels and again.result.search == "fixed"
    assert torch.equal(logits(rebuilt), logits(compressed))
    # levels as a dict need the config they were found with
    with pytest.raises(ValueError, match="pass config=EvoPressConfig"):
        EvoPressCompressor(make_model(num_layers=3), tokenizer).apply(compressor.result.levels)
    other = EvoPressCompressor(make_model(num_layers=3), tokenizer)
    other.apply(compressor.result.levels, config=compressor.config, progress=False)
    assert torch.equal(logits(other.model), logits(compressed))
    with pytest.raises(ValueError, match="already compressed"):  # the model in `other` is no longer the base model
        other.apply(compressor.result.levels, config=compressor.config, progress=False)


def test_the_card_names_a_hub_base_model_in_its_metadata_but_not_a_local_path(saved, tmp_path):
    from optimum_evopress.model_card import model_card_text

    compressor, _, _ = saved
    record = compressor.record()
    hub_card = huggingface_hub.ModelCard(model_card_text({**record, "base_model": "HuggingFaceTB/SmolLM2-135M"}))
    assert hub_card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "AutoModelForCausalLM.from_pretrained('HuggingFaceTB/SmolLM2-135M')" in hub_card.text
    local_card = huggingface_hub.ModelCard(model_card_text({**record, "base_model": str(tmp_path)}))
    assert local_card.data.base_model is None and f"`{tmp_path}` compressed with" in local_card.text


def test_reading_a_record_from_something_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, hub, monkeypatch):
    from optimum_evopress.hub import read_record

    with pytest.raises(FileNotFoundError, match="no EvoPress checkpoint directory"):
        read_record(str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not an EvoPress checkpoint: no evopress_config.json"):
        load_compressed(tmp_path / "plain")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(FileNotFoundError, match="no local directory and no Hub repo"):
        read_record("tester/absent")


def test_a_bare_repo_name_gets_a_card_naming_the_created_repo_and_a_revision_gets_its_branch(saved, hub,
                                                                                             monkeypatch):
    _, _, directory = saved
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    leftover = directory / ".evopress-new-0000"  # what a killed save leaves in an existing directory
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    try:
        push_checkpoint(directory, "bare-name", token=TOKEN)
    finally:
        (leftover / "model.safetensors").unlink()
        leftover.rmdir()
    assert not [name for name in hub.repos["tester/bare-name"]["files"] if name.startswith(".evopress")]
    card = hub.repos["tester/bare-name"]["files"]["README.md"].decode()
    assert 'model="tester/bare-name"' in card and "apply('tester/bare-name')" in card
    push_checkpoint(directory, "tester/bare-name", token=TOKEN, revision="v2")
    assert hub.commits[-1]["revision"] == "v2" and "v2" in hub.repos["tester/bare-name"]["branches"]


def test_load_compressed_reads_the_record_with_the_models_revision_and_token(saved, monkeypatch):
    from optimum_evopress import hub as hub_module

    _, _, directory = saved
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or str(directory / "evopress_config.json"))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *args, **kwargs: kwargs)
    loaded, record = hub_module.load_compressed("tester/private", revision="v2", token="secret", dtype="auto")
    assert calls == [(("tester/private", "evopress_config.json"), {"revision": "v2", "token": "secret"})]
    assert loaded == {"revision": "v2", "token": "secret", "dtype": "auto"} and "levels" in record


def test_the_card_follows_the_search_the_format_and_the_builtin_model(saved):
    from optimum_evopress.model_card import model_card_text
    from optimum_evopress.models import DEFAULT_HUB_ID

    compressor, _, _ = saved
    record = compressor.record()
    evolution = model_card_text(record)
    assert "chosen by evolutionary search on the KL divergence to the dense model" in evolution
    gptq = huggingface_hub.ModelCard(model_card_text({**record, "format": "gptq"}, repo_id="me/x"))
    assert gptq.data.library_name == "gptqmodel" and 'GPTQModel.load("me/x")' in gptq.text
    assert "pipeline(" not in gptq.text and "gptq" in gptq.data.tags
    assert "gptq" not in huggingface_hub.ModelCard(evolution).data.tags  # a compressed-tensors checkpoint
    fixed = model_card_text({**record, "search": "fixed", "config": {**record["config"], "search": "fixed",
                                                                      "levels": record["levels"]}})
    assert "given as fixed levels" in fixed and "levels={" not in fixed and "evolutionary search" not in fixed
    depth = {**record, "config": {**record["config"], "method": "depth", "granularity": None}, "granularity": None,
             "budget": {"cost": 2, "units": 6}}
    assert "**2 of 6** block units removed" in model_card_text(depth)
    builtin = huggingface_hub.ModelCard(model_card_text({**record, "base_model": "smollm2-135m"}))
    assert builtin.data.base_model == DEFAULT_HUB_ID and "model, tokenizer = load_default_model()" in builtin.text
    assert f"`{DEFAULT_HUB_ID}` (the built-in copy" in builtin.text


def test_the_builtin_models_cached_copy_is_recorded_by_its_alias(tokenizer, tmp_path, monkeypatch):
    from optimum_evopress.models import builtin_path

    monkeypatch.setenv("EVOPRESS_CACHE", str(tmp_path))
    model = make_model()
    model.name_or_path = builtin_path()
    assert EvoPressCompressor(model, tokenizer).base_model == "smollm2-135m"
    model.name_or_path = str(tmp_path / "other")
    assert EvoPressCompressor(model, tokenizer).base_model == str(tmp_path / "other")


def test_a_config_reads_from_a_hub_repo(saved, hub, monkeypatch):
    compressor, _, directory = saved
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    push_checkpoint(directory, "tester/config-repo", token=TOKEN)
    config = EvoPressConfig.from_pretrained("tester/config-repo", token=TOKEN)
    assert config.to_dict() == {**compressor.config.to_dict(), "checkpoint_path": None, "resume_from": None}
    with pytest.raises(FileNotFoundError, match="no local file and no Hub repo"):
        EvoPressConfig.from_pretrained("tester/absent", token=TOKEN)
