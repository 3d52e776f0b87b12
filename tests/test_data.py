import json

import pytest
import torch

from conftest import corpus
from optimum_evopress.data import load_texts, prepare_token_data, tokenize_to_sequences


@pytest.mark.parametrize("name", ["wikipedia", "shakespeare"])
def test_builtin_corpora_split_documents_disjointly(name):
    calibration = load_texts(name, "calibration")
    evaluation = load_texts(name, "evaluation")
    assert len(calibration) > 10 and len(evaluation) > 10
    assert not set(calibration) & set(evaluation)
    assert sum(map(len, calibration)) > 500_000
    if name == "wikipedia":
        assert not any("'''" in text for text in calibration)  # wiki markup is cleaned


def test_sequences_have_no_special_tokens(tokenizer):
    sequences = tokenize_to_sequences(corpus(), tokenizer, 32)
    assert sequences.shape[1] == 32 and sequences.shape[0] > 20
    assert tokenizer.eos_token_id not in sequences.unique().tolist()


def test_calibration_and_evaluation_do_not_overlap(tokenizer):
    texts = corpus()
    stream = tokenize_to_sequences(texts, tokenizer, 16)
    data = prepare_token_data(texts, tokenizer, 16, calibration_tokens=160, evaluation_tokens=64, seed=1)
    assert data.calibration.shape == (10, 16) and data.evaluation.shape == (4, 16)
    torch.testing.assert_close(data.evaluation, stream[-4:])
    rows = {tuple(r) for r in stream[:-4].tolist()}
    assert all(tuple(r) in rows for r in data.calibration.tolist())
    again = prepare_token_data(texts, tokenizer, 16, calibration_tokens=160, evaluation_tokens=64, seed=1)
    assert torch.equal(again.calibration, data.calibration)


def test_too_little_text_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="calibration_tokens.*holds only"):
        prepare_token_data(corpus(3), tokenizer, 16, calibration_tokens=100_000)


def test_text_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        tokenize_to_sequences(["some text"], None, 8)


def test_local_files_folders_and_datasets(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n" + json.dumps({"text": "third"}))
    assert load_texts(str(tmp_path / "a.txt")) == ["first document"]
    assert sorted(load_texts(str(tmp_path))) == ["first document", "second", "third"]
    dataset = datasets.Dataset.from_dict({"content": ["x y", "z"]})
    assert load_texts(dataset, text_column="content") == ["x y", "z"]
    with pytest.raises(ValueError, match="text_column"):
        load_texts(dataset)


def test_unknown_name_explains_the_sources(monkeypatch):
    import datasets
    import huggingface_hub

    # Offline mode is read at import time, so set the flags the libraries consult, not only the environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ValueError, match="not a built-in corpus"):
        load_texts("no-such-user/no-such-dataset-xyz")
