"""SparseGPT for several sparsities from one factorisation, the compact variant encoding, and GPTQ that keeps zeros."""

import pytest
import torch

from optimum_evopress.gptq import dequantize, gptq_quantize
from optimum_evopress.sparsegpt import decode_sparse, encode_sparse, pack_mask, sparsegpt_prune, unpack_mask
from optimum_evopress.gptq import HessianAccumulator
from test_gptq import _output_error, _problem


def _low_rank_problem(rows=48, columns=128, tokens=2048, rank=16, seed=0):
    """Inputs close to a low-rank subspace, as transformer activations are: OBS updates have room to help."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=g)
    inputs = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, columns, generator=g)
    inputs += 0.1 * torch.randn(tokens, columns, generator=g)
    accumulator = HessianAccumulator(columns)
    accumulator.add_batch(inputs)
    return weight, inputs, accumulator.hessian()


def _magnitude(weight, zeros):
    pruned = weight.clone()
    pruned.view(-1)[weight.abs().reshape(-1).argsort()[:zeros]] = 0
    return pruned


def test_every_level_has_exactly_its_zeros_and_beats_magnitude_pruning():
    weight, inputs, hessian = _low_rank_problem()
    counts = [0, 1000, 3072, 4500, weight.numel() - 1]
    variants = sparsegpt_prune(weight, hessian, counts)
    errors = []
    for zeros in counts:
        variant = variants[zeros]
        assert int((variant.weight == 0).sum()) == zeros
        measured = _output_error(weight, variant.weight, inputs)
        assert variant.error == pytest.approx(measured, rel=1e-3, abs=1e-6)
        errors.append(variant.error)
    assert errors == sorted(errors) and errors[0] < 1e-6  # more zeros, more error; none: exact
    for zeros in (3072, 4500):  # the OBS updates beat zeroing the smallest weights
        assert variants[zeros].error < 0.4 * _output_error(weight, _magnitude(weight, zeros), inputs)


def test_stacked_solve_equals_separate_solves():
    weight, _, hessian = _problem(rows=16, columns=64)
    together = sparsegpt_prune(weight, hessian, [300, 700], block_size=32)
    for zeros in (300, 700):
        alone = sparsegpt_prune(weight, hessian, [zeros], block_size=32)[zeros]
        torch.testing.assert_close(together[zeros].weight, alone.weight, rtol=1e-4, atol=1e-5)


def test_bfloat16_output_keeps_the_exact_count():
    weight, _, hessian = _problem(rows=32, columns=64)
    variant = sparsegpt_prune(weight, hessian, [1000], dtype=torch.bfloat16)[1000]
    assert variant.weight.dtype == torch.bfloat16 and int((variant.weight == 0).sum()) == 1000


def test_bad_counts_are_refused():
    weight, _, hessian = _problem(rows=8, columns=32)
    with pytest.raises(ValueError, match=r"zeros must lie in \[0, 256\)"):
        sparsegpt_prune(weight, hessian, [256])


def test_mask_and_sparse_encoding_round_trip():
    mask = torch.rand(7, 13) > 0.4
    assert torch.equal(unpack_mask(pack_mask(mask), mask.shape), mask)
    assert pack_mask(mask).numel() == (7 * 13 + 7) // 8
    weight = torch.randn(6, 10, dtype=torch.bfloat16) * (torch.rand(6, 10) > 0.5)
    encoded = encode_sparse(weight)
    assert torch.equal(decode_sparse(encoded["mask"], encoded["values"], weight.shape), weight)


def test_gptq_keeps_zeros_and_compensates_on_the_rest():
    weight, inputs, hessian = _problem()
    pruned = sparsegpt_prune(weight, hessian, [3000])[3000].weight
    kept = gptq_quantize(pruned, hessian, [4, 3], group_size=32, keep_zeros=True)
    plain = gptq_quantize(pruned, hessian, [4, 3], group_size=32)
    for bits in (4, 3):
        assert torch.equal(kept[bits].qweight == 0, (kept[bits].qweight == 0) | (pruned == 0))
        assert bool((kept[bits].qweight[pruned == 0] == 0).all())
        assert bool((plain[bits].qweight[pruned == 0] != 0).any())  # without the mask GPTQ fills them in
        approx = dequantize(kept[bits].qweight, kept[bits].scale, torch.float32)
        assert _output_error(pruned, approx, inputs) < 1.5 * _output_error(pruned, dequantize(
            plain[bits].qweight, plain[bits].scale, torch.float32), inputs) + 0.01
