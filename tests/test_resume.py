"""Long runs survive SIGKILL: the database build and the search continue where they stopped, with the same result."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from conftest import corpus, make_model
from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.database import MANIFEST_NAME, PROGRESS_NAME, VariantDatabase
from optimum_evopress.records import write_atomically

TESTS = os.path.dirname(os.path.abspath(__file__))

# Runs one compression in a child process; it kills itself (SIGKILL, no cleanup of any kind) after
# storing layer `--kill-after-layer` of the database, or before scoring candidate `--kill-before-score`.
_CHILD = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from conftest import make_model, make_tokenizer
from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.database import VariantDatabase
from optimum_evopress.fitness import FitnessEvaluator

settings, kill_after_layer, kill_before_score, output = json.loads(sys.argv[2]), *map(int, sys.argv[3:5]), sys.argv[5]

def killing(function, at):
    calls = [0]
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at and function is FitnessEvaluator.score:
            os.kill(os.getpid(), signal.SIGKILL)
        result = function(*args, **kwargs)
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapper

if kill_after_layer:
    VariantDatabase.add_layer = killing(VariantDatabase.add_layer, kill_after_layer)
if kill_before_score:
    FitnessEvaluator.score = killing(FitnessEvaluator.score, kill_before_score)
compressor = EvoPressCompressor(make_model(num_layers=4), make_tokenizer())
compressor.compress(EvoPressConfig(**settings), progress=False)
with open(output, "w") as handle:
    json.dump({"levels": compressor.result.levels, "fitness": [row["fitness"] for row in compressor.result.history]},
              handle)
"""


def settings(**overrides):
    values = dict(method="quantization", target=2.5, bits=[2, 3, 4, 8], group_size=16, calibration_dataset=corpus(),
                  generations=5, offspring=4, survivors_per_selection=[2, 1], tokens_per_selection=[64, 256],
                  calibration_tokens=512, sequence_length=32, evaluation_tokens=0, initial_candidates=4, seed=0)
    values.update(overrides)
    return values


def run_child(tmp_path, values, kill_after_layer=0, kill_before_score=0):
    output = tmp_path / "result.json"
    if output.exists():
        output.unlink()
    process = subprocess.run(
        [sys.executable, "-c", _CHILD, TESTS, json.dumps(values), str(kill_after_layer), str(kill_before_score),
         str(output)], capture_output=True, text=True, cwd=tmp_path)
    return process, (json.loads(output.read_text()) if output.exists() else None)


@pytest.mark.process
def test_killed_database_build_and_search_resume_to_the_uninterrupted_result(tokenizer, tmp_path):
    reference = EvoPressCompressor(make_model(num_layers=4), tokenizer)
    reference.compress(EvoPressConfig(**settings(database_dir=str(tmp_path / "reference_db"))), progress=False)

    database, state = tmp_path / "db", str(tmp_path / "search.json")
    values = settings(database_dir=str(database), checkpoint_path=state, resume_from=state)
    # Killed mid-database: 10 of 28 layers stored, block 1 half done.
    process, result = run_child(tmp_path, values, kill_after_layer=10)
    assert process.returncode == -signal.SIGKILL and result is None, process.stderr
    progress = json.loads((database / PROGRESS_NAME).read_text())
    assert len(progress["layers"]) == 10 and not (database / MANIFEST_NAME).exists()
    assert not os.path.exists(state)

    # Continued, then killed mid-search, in generation 3: the initial pool takes 4 + 2 scores, each
    # generation 4 + 3 (the two survivors and the parent).
    process, result = run_child(tmp_path, values, kill_before_score=6 + 2 * 7 + 3)
    assert process.returncode == -signal.SIGKILL and result is None, process.stderr
    assert (database / MANIFEST_NAME).exists() and not (database / PROGRESS_NAME).exists()
    assert json.loads(open(state).read())["generation"] == 2

    process, result = run_child(tmp_path, values)
    assert process.returncode == 0, process.stderr
    assert result["levels"] == reference.result.levels
    assert result["fitness"] == [row["fitness"] for row in reference.result.history]
    # The continued build wrote byte-identical variants.
    built = json.loads((database / MANIFEST_NAME).read_text())
    clean = json.loads((tmp_path / "reference_db" / MANIFEST_NAME).read_text())
    assert {name: entry["sha256"] for name, entry in built["layers"].items()} == {
        name: entry["sha256"] for name, entry in clean["layers"].items()}
    assert built["errors"] == clean["errors"]


def test_mismatched_or_damaged_states_are_refused(tokenizer, tmp_path):
    state = str(tmp_path / "search.json")

    def compress(**overrides):
        compressor = EvoPressCompressor(make_model(num_layers=4), tokenizer)
        compressor.compress(EvoPressConfig(**settings(**overrides)), progress=False)
        return compressor

    compress(generations=1, checkpoint_path=state, database_dir=str(tmp_path / "db"))
    # Other calibration data: same space and search settings, another run.
    with pytest.raises(ValueError, match=r"another run; it differs in \['calibration'"):
        compress(calibration_dataset=corpus(41), resume_from=state, database_dir=str(tmp_path / "db2"))
    assert not (tmp_path / "db2").exists()  # refused before the database was built
    with pytest.raises(ValueError, match="other search settings"):
        compress(offspring=3, resume_from=state, database_dir=str(tmp_path / "db"))
    with open(state, "r+") as handle:
        handle.truncate(40)
    with pytest.raises(ValueError, match="cannot read search state"):
        compress(resume_from=state, database_dir=str(tmp_path / "db"))
    # A missing state is an error unless it is also where this run writes its state.
    with pytest.raises(FileNotFoundError, match="resume_from"):
        compress(resume_from=str(tmp_path / "none.json"))


def test_partial_database_with_other_settings_or_a_damaged_file_is_refused(tmp_path):
    database = tmp_path / "db"
    values = settings(database_dir=str(database))
    process, _ = run_child(tmp_path, values, kill_after_layer=5)
    assert process.returncode == -signal.SIGKILL
    process, _ = run_child(tmp_path, settings(database_dir=str(database), group_size=32))
    assert process.returncode != 0
    assert "partial database" in process.stderr and "group_size: database has 16, asked for 32" in process.stderr
    progress = json.loads((database / PROGRESS_NAME).read_text())
    victim = database / next(iter(progress["layers"].values()))["file"]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    process, _ = run_child(tmp_path, values)
    assert process.returncode != 0 and "is damaged (checksum mismatch)" in process.stderr


def _small_database(directory, finish=True):
    database = VariantDatabase({"group_size": 16}, directory)
    for name in ("l0", "l1"):
        database.add_layer(name, {"w": torch.arange(4.0)}, {2: 0.5, 4: 0.1})
    if finish:
        database.finish()
    return database


# Each damages a database record (its bytes, or its JSON object) and names what the error must say.
_DAMAGED_RECORDS = {
    "binary garbage": (lambda record: b"\xff\xfe\x00\x81garbage", "cannot read {name}"),
    "a JSON list": (lambda record: b"[1, 2]", "{name} is damaged (a JSON list, not an object)"),
    "no layers": (lambda record: record.pop("layers"), "{name} is damaged (it has no 'layers')"),
    "settings a list": (lambda record: record.update(settings=[1]), "'settings' is a list, not an object"),
    "a layer without its file": (lambda record: record["layers"]["l0"].pop("file"), "layer 'l0' needs a 'file'"),
    "a layer without errors": (lambda record: record["errors"].pop("l1"), "layer 'l1' has no errors"),
}


@pytest.mark.parametrize("name", [MANIFEST_NAME, PROGRESS_NAME])
@pytest.mark.parametrize("damage", list(_DAMAGED_RECORDS))
def test_a_damaged_database_record_is_a_clear_value_error(tmp_path, name, damage):
    directory = tmp_path / "db"
    _small_database(directory, finish=name == MANIFEST_NAME)
    path = directory / name
    change, message = _DAMAGED_RECORDS[damage]
    record = json.loads(path.read_text())
    raw = change(record)
    path.write_bytes(raw if isinstance(raw, bytes) else json.dumps(record).encode())
    with pytest.raises(ValueError, match="db") as error:
        if name == MANIFEST_NAME:
            VariantDatabase.open(directory, {"group_size": 16}, ["l0", "l1"])
        else:
            VariantDatabase.start({"group_size": 16}, directory)
    assert message.format(name=name) in str(error.value)
    assert type(error.value) is ValueError  # not a UnicodeDecodeError or another subclass


def test_records_get_the_usual_file_mode_and_are_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda *args: events.append("replace") or replace(*args))
    umask = os.umask(0o022)
    try:
        write_atomically(tmp_path / "state.json", lambda tmp: open(tmp, "w").close(), ".json")
        assert events == ["fsync", "replace", "fsync"]  # the file, then the directory holding the rename
        _small_database(tmp_path / "db")
    finally:
        os.umask(umask)
    # Readable by others, as any file made under this umask (a shared database_dir); no temporary file left.
    assert stat.S_IMODE(os.stat(tmp_path / "state.json").st_mode) == 0o644
    assert sorted(os.listdir(tmp_path / "db")) == ["l0.safetensors", "l1.safetensors", MANIFEST_NAME]
    for file in os.listdir(tmp_path / "db"):
        assert stat.S_IMODE(os.stat(tmp_path / "db" / file).st_mode) == 0o644, file
