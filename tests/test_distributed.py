"""Two CPU processes under torchrun (gloo) share the database build and the search, and find what one process finds."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import corpus, logits, make_model
from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.database import MANIFEST_NAME
from optimum_evopress.distributed import ProcessGroup, balanced_shares
from test_resume import settings

TESTS = os.path.dirname(os.path.abspath(__file__))

_WORKER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from conftest import input_ids, make_model, make_tokenizer
from optimum_evopress import EvoPressCompressor, EvoPressConfig

values, root = json.loads(sys.argv[2]), sys.argv[3]
compressor = EvoPressCompressor(make_model(num_layers=4), make_tokenizer())
model = compressor.compress(EvoPressConfig(**values), save_dir=os.path.join(root, "out"), progress=False)
rank = compressor.group.rank
with torch.no_grad():
    torch.save(model(input_ids=input_ids()).logits, os.path.join(root, f"logits{rank}.pt"))
with open(os.path.join(root, f"result{rank}.json"), "w") as handle:
    json.dump({"levels": compressor.result.levels, "fitness": [row["fitness"] for row in compressor.result.history],
               "world_size": compressor.group.world_size, "device": str(next(model.parameters()).device)}, handle)
"""


def test_balanced_shares_split_by_cost_and_cover_every_item():
    shares = balanced_shares([9, 1, 1, 4, 4, 1], 2)
    assert sorted(i for share in shares for i in share) == list(range(6))
    assert sorted(sum([9, 1, 1, 4, 4, 1][i] for i in share) for share in shares) == [10, 10]
    assert balanced_shares([3, 2], 1) == [[0, 1]]
    assert balanced_shares([1], 3) == [[0], [], []]


def test_single_process_group_is_local():
    group = ProcessGroup()
    assert group.is_main and not group.active and group.all_gather(5) == [5]
    assert group.resolve_device("cpu") == "cpu"
    assert ProcessGroup(1, 2, 1).resolve_device("cuda") == "cuda:1"


@pytest.mark.process
def test_two_processes_build_and_search_like_one(tokenizer, tmp_path):
    values = settings(database_dir=str(tmp_path / "db"), checkpoint_path=str(tmp_path / "search.json"), device="cpu")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
         sys.executable, "-c", _WORKER, TESTS, json.dumps(values), str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]

    # Reductions may round differently with another number of threads: compare at one thread, as the workers run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = EvoPressCompressor(make_model(num_layers=4), tokenizer)
        single.compress(EvoPressConfig(**settings(database_dir=str(tmp_path / "single_db"), device="cpu")),
                        progress=False)
        expected = logits(single.model)
    finally:
        torch.set_num_threads(threads)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result{rank}.json").read_text())
        assert result["world_size"] == 2 and result["device"] == "cpu"
        assert result["levels"] == single.result.levels
        assert result["fitness"] == [row["fitness"] for row in single.result.history]
        torch.testing.assert_close(torch.load(tmp_path / f"logits{rank}.pt"), expected, rtol=0, atol=0)
    # The database the two processes built, each solving a share of every block, is byte-identical.
    shared = json.loads((tmp_path / "db" / MANIFEST_NAME).read_text())
    alone = json.loads((tmp_path / "single_db" / MANIFEST_NAME).read_text())
    assert {n: e["sha256"] for n, e in shared["layers"].items()} == {n: e["sha256"] for n, e in alone["layers"].items()}
    # Only the main process wrote: one checkpoint, one search state, no stray temporary files.
    assert (tmp_path / "out" / "evopress_config.json").is_file()
    assert json.loads((tmp_path / "search.json").read_text())["generation"] == values["generations"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


@pytest.mark.process
def test_cli_under_torchrun_writes_one_checkpoint(tokenizer, tmp_path):
    base = tmp_path / "base"
    make_model(num_layers=4).save_pretrained(base)
    tokenizer.save_pretrained(base)
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n\n".join(corpus()))
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "optimum_evopress", "compress", "--model", str(base), "--method", "depth", "--target", "0.5",
         "--calibration-dataset", str(corpus_file), "--sequence-length", "16", "--calibration-tokens", "256",
         "--evaluation-tokens", "0", "--generations", "2", "--offspring", "4", "--survivors-per-selection", "2", "1",
         "--tokens-per-selection", "32", "128", "--initial-candidates", "2", "--device", "cpu", "--quiet",
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    assert process.stdout.count("budget: 2 of 4 units") == 1  # the main process alone reports
    record = json.loads((tmp_path / "out" / "evopress_config.json").read_text())
    assert sum(level == "dropped" for level in record["levels"].values()) == 2


_LATE_RANK = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from conftest import make_model, make_tokenizer
from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.database import VariantDatabase
from test_resume import settings

# Rank 1 looks for the database a moment later, after the main process has finished it (here: it believes so).
real = VariantDatabase.exists
VariantDatabase.exists = staticmethod(lambda directory: real(directory) or dist.get_rank() == 1)
values = settings(method="quantization", target=3.0, bits=[2, 4], group_size=16, database_dir=sys.argv[2],
                  device="cpu", generations=1)
EvoPressCompressor(make_model(num_layers=2), make_tokenizer()).compress(EvoPressConfig(**values), progress=False)
"""


@pytest.mark.process
def test_every_process_follows_the_main_processs_view_of_the_database(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
         sys.executable, "-c", _LATE_RANK, TESTS, str(tmp_path / "db")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    assert (tmp_path / "db" / MANIFEST_NAME).is_file()
