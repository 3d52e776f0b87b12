import json
import subprocess
import sys

import pytest

from conftest import corpus, make_model


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
