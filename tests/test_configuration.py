import json

import pytest
import torch

from optimum_evopress import EvoPressConfig
from optimum_evopress.configuration import CONFIG_NAME


def test_round_trip_through_dict_json_and_directory(tmp_path):
    config = EvoPressConfig(method="depth", target=0.3, granularity="sublayer", generations=7, offspring=6,
                            survivors_per_selection=[3, 1], tokens_per_selection=[64, 256], calibration_tokens=512,
                            sequence_length=64, fitness="topk_kl", topk=5, seed=3, calibration_dataset=["a", "b"])
    assert EvoPressConfig.from_dict(config.to_dict()) == config
    config.to_json_file(tmp_path / "c.json")
    assert EvoPressConfig.from_json_file(tmp_path / "c.json") == config
    config.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / CONFIG_NAME).is_file()
    assert EvoPressConfig.from_pretrained(tmp_path / "saved") == config
    # A checkpoint's evopress_config.json wraps the config with the result; it reads back the same.
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps({"config": config.to_dict(), "levels": {}}))
    assert EvoPressConfig.from_pretrained(tmp_path / "ckpt") == config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(method="pruning"), "method"),
        (dict(fitness="mse"), "fitness"),
        (dict(fitness="topk_kl_renormalized", topk=1), "topk"),
        (dict(target=0.0), "target"),
        (dict(target=1.0), "target"),
        (dict(target=-0.2), "target"),
        (dict(granularity="head"), "granularity"),
        (dict(search="genetic"), "search"),
        (dict(preset="huge"), "preset"),
        (dict(survivors_per_selection=[2, 2]), "survivors_per_selection"),
        (dict(survivors_per_selection=[1, 2, 1]), "survivors_per_selection"),
        (dict(offspring=4, survivors_per_selection=[8, 1]), "survivors_per_selection"),
        (dict(survivors_per_selection=[4, 1], tokens_per_selection=[128]), "tokens_per_selection"),
        (dict(calibration_tokens=1024, tokens_per_selection=[256, 4096]), "tokens_per_selection"),
        (dict(generations=0), "generations"),
        (dict(sequence_length=1), "sequence_length"),
        (dict(calibration_dataset=""), "calibration_dataset"),
        (dict(calibration_dataset=[]), "calibration_dataset"),
        (dict(dtype="int8"), "dtype"),
        (dict(device="gpu:zero"), "device"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EvoPressConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(generations=2.5), dict(target="0.25"), dict(calibration_dataset=3),
                                    dict(calibration_dataset=["ok", 1]), dict(seed=True)])
def test_wrong_types_raise_type_error(kwargs):
    with pytest.raises(TypeError):
        EvoPressConfig(**kwargs)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown fields"):
        EvoPressConfig.from_dict({"method": "depth", "generation": 3})


def test_in_memory_dataset_is_recorded_not_silently_lost():
    datasets = pytest.importorskip("datasets")
    config = EvoPressConfig(calibration_dataset=datasets.Dataset.from_dict({"text": ["a b c"]}))
    recorded = config.to_dict()["calibration_dataset"]
    assert recorded["num_rows"] == 1
    with pytest.raises(ValueError, match="in-memory"):
        EvoPressConfig.from_dict(config.to_dict())


def test_paths_and_devices_are_stored_as_strings_so_the_record_saves(tmp_path):
    import pathlib

    config = EvoPressConfig(checkpoint_path=pathlib.Path(tmp_path / "s.json"), resume_from=tmp_path / "s.json",
                            calibration_dataset=tmp_path / "text.txt", device=torch.device("cpu"))
    assert config.checkpoint_path == config.resume_from == str(tmp_path / "s.json")
    assert config.calibration_dataset == str(tmp_path / "text.txt") and config.device == "cpu"
    config.save_pretrained(tmp_path / "cfg")
    assert EvoPressConfig.from_pretrained(tmp_path / "cfg") == config
    with pytest.raises(ValueError, match="checkpoint_path: .* is a directory"):
        EvoPressConfig(checkpoint_path=tmp_path)
    with pytest.raises(TypeError, match="resume_from must be a path"):
        EvoPressConfig(resume_from=3)


def test_a_dataset_with_splits_asks_for_one():
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                                   "test": datasets.Dataset.from_dict({"text": ["b"]})})
    with pytest.raises(ValueError, match=r"calibration_dataset: a dataset with splits \['train', 'test'\]; pass one "
                                         r"split, e.g. dataset\['train'\]"):
        EvoPressConfig(calibration_dataset=splits)


def test_a_missing_local_config_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the Hub"))
    for path in ("/missing.json", "configs/evopress_config.json", str(tmp_path / "none")):
        with pytest.raises(FileNotFoundError, match="no evopress_config.json"):
            EvoPressConfig.from_pretrained(path)
