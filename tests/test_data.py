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


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """`datasets`, with the cache that `load_dataset` writes for local files kept under tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return datasets


def test_jsonl_without_the_text_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"content": "two"}) + "\n")
    with pytest.raises(ValueError, match=r"text_column: line 3 of .*a\.jsonl.* no key 'text' \(keys: \['content'\]\)"):
        load_texts(str(path))
    with pytest.raises(ValueError, match=r"line 1 of .*a\.jsonl.* no key 'content'"):
        load_texts(str(path), text_column="content")


def test_json_file_is_json_lines_or_one_array(tmp_path):
    (tmp_path / "objects.json").write_text(json.dumps([{"text": "a"}, {"text": None}, {"text": "b"}], indent=2))
    (tmp_path / "strings.json").write_text(json.dumps(["c", "d"]))
    (tmp_path / "lines.json").write_text(json.dumps({"text": "e"}) + "\n" + json.dumps({"text": "f"}))
    (tmp_path / "object.json").write_text(json.dumps({"data": [{"text": "g"}]}, indent=2))
    (tmp_path / "numbers.json").write_text("[1, 2]")
    assert load_texts(str(tmp_path / "objects.json")) == ["a", "b"]
    assert load_texts(str(tmp_path / "strings.json")) == ["c", "d"]
    assert load_texts(str(tmp_path / "lines.json")) == ["e", "f"]
    with pytest.raises(ValueError, match=r"line 1 of .*object\.json.* not valid JSON"):
        load_texts(str(tmp_path / "object.json"))
    with pytest.raises(ValueError, match=r"item 0 of .*numbers\.json.* is a int"):
        load_texts(str(tmp_path / "numbers.json"))


def test_table_files_and_saved_datasets_are_read_with_datasets(tmp_path, datasets_cache):
    datasets = datasets_cache
    table = datasets.Dataset.from_dict({"text": ["first row", None, "third row"], "n": [1, 2, 3]})
    table.to_parquet(str(tmp_path / "e.parquet"))
    table.to_csv(str(tmp_path / "e.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "e.arrow").write_bytes(next((tmp_path / "saved").glob("*.arrow")).read_bytes())
    for name in ("e.parquet", "e.csv", "e.arrow", "saved"):
        assert load_texts(str(tmp_path / name)) == ["first row", "third row"], name
    with pytest.raises(ValueError, match=r"text_column: 'body' is not a column of .*e\.parquet"):
        load_texts(str(tmp_path / "e.parquet"), text_column="body")
    datasets.DatasetDict(train=table, test=table.select([0])).save_to_disk(str(tmp_path / "saved_dict"))
    assert load_texts(str(tmp_path / "saved_dict"), dataset_split="test") == ["first row"]
    with pytest.raises(ValueError, match=r"dataset_split: 'validation' is not a split .*\['train', 'test'\]"):
        load_texts(str(tmp_path / "saved_dict"), dataset_split="validation")


def test_files_of_other_types_are_read_as_text_or_rejected(tmp_path):
    for name in ("notes", "notes.text", "NOTES.TXT", "notes.rst"):
        (tmp_path / name).write_text("plain text")
        assert load_texts(str(tmp_path / name)) == ["plain text"]
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4 \xff\xfe binary")
    with pytest.raises(ValueError, match=r"paper\.pdf.*accepted: text files .*\.parquet, \.csv, \.arrow"):
        load_texts(str(tmp_path / "paper.pdf"))


def test_folders_read_data_files_and_leave_out_dataset_cards(tmp_path, datasets_cache):
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nlicense: mit\n---\n# A dataset card")
    (hub / ".gitattributes").write_text("*.parquet filter=lfs")
    (hub / "dataset_infos.json").write_text(json.dumps({"default": {"features": {}}}, indent=2))
    datasets_cache.Dataset.from_dict({"text": ["row a", "row b"]}).to_parquet(str(hub / "data" / "train.parquet"))
    assert load_texts(str(hub)) == ["row a", "row b"]
    notes = tmp_path / "notes"
    (notes / "b").mkdir(parents=True)
    for name, text in [("b.txt", "2"), ("a.md", "1"), ("b/c.txt", "3"), ("c.log", "x")]:
        (notes / name).write_text(text)
    assert load_texts(str(notes)) == ["1", "2", "3"]  # text files in sorted path order, other types left out
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "c.log").write_text("x")
    with pytest.raises(ValueError, match="no text or data files in the folder .*accepted"):
        load_texts(str(tmp_path / "empty"))


def test_null_texts_are_skipped(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": None}) + "\n" + json.dumps({"text": "kept"}))
    assert load_texts(str(tmp_path / "a.jsonl")) == ["kept"]
    assert load_texts([None, "kept"]) == ["kept"]
    assert load_texts(datasets.Dataset.from_dict({"text": ["kept", None]})) == ["kept"]


def test_dataset_dicts_need_a_split():
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"text": ["x"]})
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train', 'test'\]: pass one .*dataset\['train'\]"):
        load_texts(datasets.DatasetDict(train=table, test=table))


def test_iterable_datasets_without_known_columns():
    datasets = pytest.importorskip("datasets")

    def rows():
        yield {"text": "streamed"}
        yield {"text": None}
        yield {"body": "no text key"}

    dataset = datasets.IterableDataset.from_generator(rows)
    assert dataset.column_names is None
    with pytest.raises(ValueError, match=r"text_column: 'text' is not a key of row 2 .*\['body'\]"):
        load_texts(dataset)
    assert load_texts(datasets.IterableDataset.from_generator(lambda: iter([{"text": "a"}, {"text": None}]))) == ["a"]
    assert load_texts(datasets.Dataset.from_dict({"text": ["b", "c"]}).to_iterable_dataset()) == ["b", "c"]


@pytest.mark.parametrize("column, kind", [("ids", "list"), ("messages", "list"), ("label", "int")])
def test_columns_of_non_strings_are_a_type_error(column, kind):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"ids": [[0, 1, 2]], "label": [3],
                                          "messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(TypeError, match=rf"text_column '{column}' of the dataset holds {kind} values, not strings"):
        load_texts(dataset, text_column=column)
    with pytest.raises(TypeError, match="the list of texts holds int values"):
        load_texts(["text", 7])


def test_an_empty_source_is_a_clear_error(tokenizer):
    from conftest import make_model
    from optimum_evopress.evaluation import evaluate_perplexity

    assert tokenize_to_sequences([], tokenizer, 8).shape == (0, 8)
    with pytest.raises(ValueError, match=r"no text in the calibration source \(the list of 0 strings\)"):
        prepare_token_data([], tokenizer, 8, calibration_tokens=16)
    with pytest.raises(ValueError, match=r"no text in the evaluation source \(the list of 2 strings\)"):
        evaluate_perplexity(make_model(num_layers=1), tokenizer, ["", None], sequence_length=8, progress=False)
