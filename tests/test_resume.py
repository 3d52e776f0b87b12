"""Long runs survive SIGKILL: the database build and the search continue where they stopped, with the same result."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import corpus, make_model
from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.database import MANIFEST_NAME, PROGRESS_NAME

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
