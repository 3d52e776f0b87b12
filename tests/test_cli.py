import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import corpus, disk_offload_map, make_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny") / "model"
    make_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    text = tmp_path_factory.mktemp("text") / "calibration.txt"
    text.write_text("\n\n".join(corpus()))
    return path, text


def evopress(*args):
    return subprocess.run([sys.executable, "-m", "optimum_evopress.cli", *map(str, args)], capture_output=True,
                          text=True)


SMALL = ["--sequence-length", "16", "--calibration-tokens", "256", "--evaluation-tokens", "64", "--offspring", "4",
         "--survivors-per-selection", "2", "1", "--tokens-per-selection", "32", "128", "--generations", "2",
         "--initial-candidates", "2", "--quiet"]


@pytest.mark.process
def test_compress_and_evaluate_from_the_shell(tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    out = tmp_path / "out"
    done = evopress("compress", "--model", model, "--calibration-dataset", text, "--target", "0.34", "--output", out,
                    *SMALL)
    assert done.returncode == 0, done.stderr
    assert "preset 'paper'" in done.stdout and "budget: 2 of 6 units" in done.stdout
    record = json.loads((out / "evopress_config.json").read_text())
    assert sum(level == "dropped" for level in record["levels"].values()) == 2
    # A saved record is a config file too: rerun it with one flag changed.
    again = evopress("compress", "--model", model, "--config", out / "evopress_config.json", "--search", "shortgpt",
                     "--output", tmp_path / "again", "--quiet")
    assert again.returncode == 0, again.stderr
    evaluated = evopress("evaluate", "--model", out, "--dataset", text, "--sequence-length", "16", "--tokens", "64")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["perplexity"] > 1


@pytest.mark.process
def test_quantize_from_the_shell_then_apply_a_levels_file(tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    out = tmp_path / "out"
    quantize = ["--model", model, "--calibration-dataset", text, "--method", "quantization", "--target", "3",
                "--bits", "2", "3", "4", "--group-size", "16", "--act-order", "true", *SMALL]
    done = evopress("compress", *quantize, "--output", out)
    assert done.returncode == 0, done.stderr
    assert "average bits: 3.0000 (target 3.0)" in done.stdout
    record = json.loads((out / "evopress_config.json").read_text())
    assert record["config"]["act_order"] is True and record["config"]["bits"] == [2, 3, 4]
    levels = tmp_path / "levels.txt"
    levels.write_text("".join(f"{name}: {bits}\n" for name, bits in record["levels"].items()))
    fixed = evopress("compress", *quantize, "--search", "fixed", "--levels", levels, "--output", tmp_path / "fixed")
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads((tmp_path / "fixed" / "evopress_config.json").read_text())["levels"] == record["levels"]
    bad = evopress("compress", *quantize, "--act-order", "maybe", "--output", tmp_path / "bad")
    assert bad.returncode == 2 and "expected true or false" in bad.stderr


@pytest.mark.parametrize("flags, message", [
    (["--target", "1.5"], "EvoPressConfig.target"),
    (["--method", "quantum"], "unknown method"),
    (["--tokens-per-selection", "32", "4096"], "tokens_per_selection"),
])
def test_bad_input_exits_2_and_writes_nothing(tiny_checkpoint, tmp_path, flags, message):
    model, text = tiny_checkpoint
    args = SMALL[:]
    if "--tokens-per-selection" in flags:
        i = args.index("--tokens-per-selection")
        del args[i:i + 3]
    done = evopress("compress", "--model", model, "--calibration-dataset", text, "--output", tmp_path / "out",
                    *args, *flags)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "out").exists()


def test_non_empty_output_exits_2(tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    done = evopress("compress", "--model", model, "--calibration-dataset", text, "--output", tmp_path / "out", *SMALL)
    assert done.returncode == 2 and "not empty" in done.stderr


def test_group_size_none_and_booleans_parse_into_the_config():
    from optimum_evopress.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["compress", "--output", "x", "--method", "quantization", "--target", "3",
                                      "--group-size", "none", "--act-order", "yes", "--calibration-bits", "dense"])
    config = _config_from_args(args)
    assert config.group_size is None and config.act_order is True and config.calibration_bits == "dense"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--output", "x", "--group-size", "sixty"])


@pytest.mark.process
def test_prune_from_the_shell(tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    done = evopress("compress", "--model", model, "--calibration-dataset", text, "--method", "sparsity", "--target",
                    "0.5", "--sparsity-levels", "3", "--mutation-rule", "all", "--output", tmp_path / "out", *SMALL)
    assert done.returncode == 0, done.stderr
    assert "average sparsity: 0.50" in done.stdout and "layers from" in done.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["evopress"]["method"] == "sparsity" and len(config["evopress"]["layer_sparsity"]) == 42
    gptq = evopress("compress", "--model", model, "--calibration-dataset", text, "--method", "sparsity", "--target",
                    "0.5", "--format", "gptq", "--output", tmp_path / "bad", *SMALL)
    assert gptq.returncode == 2 and "applies to method='quantization'" in gptq.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.process
def test_quantize_a_model_offloaded_to_disk_from_the_shell(tiny_checkpoint, tmp_path):
    """`--device-map` loads the model through accelerate (here blocks 4 and 5 on disk); the result equals the
    whole model's."""
    model, text = tiny_checkpoint
    quantize = ["--model", model, "--calibration-dataset", text, "--method", "quantization", "--target", "3",
                "--bits", "2", "3", "4", "--group-size", "16", *SMALL]
    offloaded = evopress("compress", *quantize, "--device-map", json.dumps(disk_offload_map((4, 5))),
                         "--offload-folder", tmp_path / "offload", "--output", tmp_path / "offloaded")
    assert offloaded.returncode == 0, offloaded.stderr
    whole = evopress("compress", *quantize, "--output", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    records = [json.loads((tmp_path / name / "evopress_config.json").read_text()) for name in ("offloaded", "whole")]
    assert records[0]["levels"] == records[1]["levels"]
    assert [row["fitness"] for row in records[0]["history"]] == [row["fitness"] for row in records[1]["history"]]
    bad = evopress("compress", *quantize, "--offload-folder", tmp_path / "offload", "--output", tmp_path / "bad")
    assert bad.returncode == 2 and "--offload-folder needs --device-map" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.process
def test_export_applies_a_checkpoints_levels_to_the_base_model_without_a_search(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import logits

    model, text = tiny_checkpoint
    quantize = ["--model", model, "--calibration-dataset", text, "--method", "quantization", "--target", "3",
                "--bits", "2", "3", "4", "--group-size", "16", *SMALL]
    assert evopress("compress", *quantize, "--output", tmp_path / "out").returncode == 0
    # the base model is the one the checkpoint names; the config and levels come from its record
    done = evopress("export", "--levels", tmp_path / "out", "--output", tmp_path / "again", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "applied 42 unit levels" in done.stdout
    first, again = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("out", "again"))
    assert torch.equal(logits(first), logits(again))
    record = json.loads((tmp_path / "again" / "evopress_config.json").read_text())
    assert record["search"] == "fixed" and record["history"] == []
    # a levels file needs the config it was found with
    levels = tmp_path / "levels.txt"
    levels.write_text("".join(f"{n}: {b}\n" for n, b in record["levels"].items()))
    bad = evopress("export", "--levels", levels, "--model", model, "--output", tmp_path / "bad")
    assert bad.returncode == 2 and "needs --config" in bad.stderr and not (tmp_path / "bad").exists()
    wrong = evopress("export", "--levels", tmp_path / "out", "--format", "gptq", "--output", tmp_path / "bad")
    assert wrong.returncode == 2 and not (tmp_path / "bad").exists()


@pytest.mark.process
def test_every_command_has_help_with_examples_in_both_clis():
    for command in ("compress", "evaluate", "export", "push"):
        done = evopress(command, "--help")
        assert done.returncode == 0 and "examples:" in done.stdout, done.stderr
    optimum = subprocess.run([sys.executable, "-c", "from optimum.commands.optimum_cli import main; main()",
                              "evopress", "--help"], capture_output=True, text=True)
    assert optimum.returncode == 0, optimum.stderr
    assert "{compress,evaluate,export,push}" in optimum.stdout
    assert "optimum-cli evopress compress --preset cpu" in optimum.stdout
    export = subprocess.run([sys.executable, "-c", "from optimum.commands.optimum_cli import main; main()",
                             "evopress", "export", "--help"], capture_output=True, text=True)
    assert "  optimum-cli evopress export --levels" in export.stdout and "  evopress export" not in export.stdout


@pytest.mark.process
def test_optimum_cli_runs_the_same_commands_with_the_same_exit_codes(tiny_checkpoint, tmp_path):
    model, text = tiny_checkpoint
    run = [sys.executable, "-c", "from optimum.commands.optimum_cli import main; main()", "evopress"]
    done = subprocess.run([*run, "compress", "--model", str(model), "--calibration-dataset", str(text), "--target",
                           "0.34", "--output", str(tmp_path / "out"), *map(str, SMALL)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "evopress_config.json").is_file()
    bad = subprocess.run([*run, "compress", "--model", str(model), "--target", "1.5", "--output",
                          str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and "optimum-cli evopress: error: EvoPressConfig.target" in bad.stderr


@pytest.mark.process
def test_push_from_the_shell(tiny_checkpoint, tmp_path):
    from hub_server import HubServer

    model, text = tiny_checkpoint
    assert evopress("compress", "--model", model, "--calibration-dataset", text, "--target", "0.34", "--output",
                    tmp_path / "out", *SMALL).returncode == 0
    hub = HubServer("hf_cli_token").start()
    try:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_XET": "1"}
        env.pop("HF_TOKEN", None)

        def push(*args, token=None):
            return subprocess.run([sys.executable, "-m", "optimum_evopress.cli", "push", *map(str, args)],
                                  capture_output=True, text=True, env={**env, **({"HF_TOKEN": token} if token else {})})

        missing = push(tmp_path / "out", "tester/depth")
        assert missing.returncode == 2 and "no Hub token" in missing.stderr
        refused = push(tmp_path / "out", "tester/depth", token="hf_wrong")
        assert refused.returncode == 1 and "the token was refused (HTTP 401)" in refused.stderr
        not_ours = push(model, "tester/depth", token="hf_cli_token")
        assert not_ours.returncode == 2 and "not an EvoPress checkpoint" in not_ours.stderr
        assert hub.commits == []
        done = push(tmp_path / "out", "tester/depth", "--private", "--commit-message", "depth 34%",
                    token="hf_cli_token")
        assert done.returncode == 0, done.stderr
        assert hub.commits[0]["summary"] == "depth 34%" and hub.repos["tester/depth"]["private"]
        assert {"README.md", "evopress_config.json", "model.safetensors"} <= set(hub.repos["tester/depth"]["files"])
    finally:
        hub.stop()


def test_evaluate_tasks_without_lm_eval_names_the_extra_before_loading(monkeypatch, capsys):
    from optimum_evopress import cli

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("loaded the model first"))
    assert cli.main(["evaluate", "--model", "smollm2-135m", "--tasks", "arc_easy"]) == 2
    assert "pip install 'optimum-evopress[eval]'" in capsys.readouterr().err


def test_optional_booleans_parse_and_bad_numbers_or_formats_fail_before_loading(monkeypatch, capsys, tmp_path):
    from optimum_evopress import cli
    from optimum_evopress.cli import _config_from_args, build_parser

    for text, value in (("false", False), ("true", True), ("none", None)):
        args = build_parser().parse_args(["compress", "--output", "x", "--database-dir", "db",
                                          "--database-in-memory", text])
        assert _config_from_args(args).database_in_memory is value
    args = build_parser().parse_args(["compress", "--output", "x", "--search", "fixed",
                                      "--levels", '{"model.layers.0": "dropped"}'])
    assert _config_from_args(args).levels == {"model.layers.0": "dropped"}
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("loaded the model first"))
    for flags in (["--sequence-length", "0"], ["--batch-size", "0"], ["--tokens", "-5"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["evaluate", "--model", "smollm2-135m", *flags])
        assert exit_info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", "smollm2-135m", "--sequence-length", "1"]) == 2
    assert "--sequence-length: at least 2 tokens" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", "smollm2-135m", "--device", "gpu"]) == 2
    assert "--device: 'gpu' is not a torch device" in capsys.readouterr().err
    assert cli.main(["compress", "--method", "depth", "--format", "gptq", "--output", str(tmp_path / "o")]) == 2
    assert "format='gptq' applies to method='quantization'" in capsys.readouterr().err
    levels = tmp_path / "levels.txt"
    levels.write_text("model.layers.0.mlp.down_proj: 5\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"method": "quantization", "target": 3, "bits": [3, 5]}))
    assert cli.main(["export", "--levels", str(levels), "--config", str(config), "--model", "m", "--format", "gptq",
                     "--output", str(tmp_path / "o")]) == 2
    assert "GPTQ's packed layout holds [2, 3, 4, 8] bits only, got [5]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_model_that_cannot_be_read_exits_2(tmp_path, capsys):
    from optimum_evopress import cli

    assert cli.main(["evaluate", "--model", str(tmp_path / "no-such-model")]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_evaluate_scores_the_tail_of_a_local_source_which_compress_holds_out(tokenizer):
    from optimum_evopress.data import prepare_token_data, tokenize_to_sequences
    from optimum_evopress.evaluation import evaluate_perplexity, perplexity

    model = make_model()
    texts = corpus()
    held_out = prepare_token_data(texts, tokenizer, 16, 64, evaluation_tokens=48).evaluation
    assert torch.equal(tokenize_to_sequences(texts, tokenizer, 16)[-3:], held_out)
    assert evaluate_perplexity(model, tokenizer, texts, sequence_length=16, num_tokens=48, progress=False) == \
        perplexity(model, held_out, progress=False)
