"""GPTQ for several bit-widths from one factorisation."""

import pytest
import torch

from optimum_evopress.gptq import HessianAccumulator, dequantize, gptq_quantize, symmetric_range


def _problem(rows=48, columns=128, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=g)
    # Correlated inputs: GPTQ's error feedback only helps when the Hessian is not diagonal.
    inputs = torch.randn(tokens, columns, generator=g) @ torch.randn(columns, columns, generator=g) * 0.3
    accumulator = HessianAccumulator(columns)
    for chunk in inputs.split(500):
        accumulator.add_batch(chunk)
    return weight, inputs, accumulator.hessian()


def _round_to_nearest(weight, bits, group):
    lo, hi = symmetric_range(bits)
    grouped = weight.unflatten(1, (weight.shape[1] // group, group))
    scale = grouped.abs().amax(-1, keepdim=True) / (hi + 0.5)
    return (torch.clamp(torch.round(grouped / scale), lo, hi) * scale).flatten(1)


def _output_error(weight, approx, inputs):
    return float(((weight - approx) @ inputs.T).pow(2).sum() / (weight @ inputs.T).pow(2).sum())


def test_hessian_is_twice_the_mean_outer_product():
    x = torch.randn(3, 5, 4)
    accumulator = HessianAccumulator(4)
    accumulator.add_batch(x[:1])
    accumulator.add_batch(x[1:])
    flat = x.reshape(-1, 4)
    torch.testing.assert_close(accumulator.hessian(), 2 * flat.T @ flat / 15)
    with pytest.raises(ValueError, match="no inputs"):
        HessianAccumulator(4).hessian()


def test_every_bit_width_beats_round_to_nearest_and_reports_its_output_error():
    weight, inputs, hessian = _problem()
    variants = gptq_quantize(weight, hessian, [2, 3, 4, 8], group_size=32)
    errors = []
    for bits, variant in variants.items():
        lo, hi = symmetric_range(bits)
        assert variant.qweight.dtype == torch.int8 and lo <= int(variant.qweight.min()) and int(variant.qweight.max()) <= hi
        assert variant.scale.shape == (48, 4)
        approx = dequantize(variant.qweight, variant.scale, torch.float32)
        measured = _output_error(weight, approx, inputs)
        assert variant.error == pytest.approx(measured, rel=1e-3)
        assert measured < 0.8 * _output_error(weight, _round_to_nearest(weight, bits, 32), inputs)
        errors.append(measured)
    assert errors == sorted(errors, reverse=True)  # more bits, less error


def test_stacked_bit_widths_equal_separate_solves():
    weight, _, hessian = _problem(seed=1)
    together = gptq_quantize(weight, hessian, [2, 4, 6], group_size=64)
    for bits in (2, 4, 6):
        alone = gptq_quantize(weight, hessian, [bits], group_size=64)[bits]
        agree = (alone.qweight == together[bits].qweight).float().mean()
        assert agree > 0.999
        torch.testing.assert_close(alone.scale, together[bits].scale, rtol=1e-5, atol=1e-7)


def test_a_diagonal_hessian_gives_round_to_nearest():
    weight, _, _ = _problem(seed=2)
    variants = gptq_quantize(weight, torch.eye(128) * 3.0, [3], group_size=16)
    torch.testing.assert_close(dequantize(variants[3].qweight, variants[3].scale, torch.float32),
                               _round_to_nearest(weight, 3, 16))


def test_act_order_and_per_row_scales():
    weight, inputs, hessian = _problem(seed=3)
    ordered = gptq_quantize(weight, hessian, [3], group_size=32, act_order=True)[3]
    per_row = gptq_quantize(weight, hessian, [3], group_size=None)[3]
    assert per_row.scale.shape == (48, 1)
    for variant, group in ((ordered, 32), (per_row, 128)):
        approx = dequantize(variant.qweight, variant.scale, torch.float32)
        assert _output_error(weight, approx, inputs) < _output_error(weight, _round_to_nearest(weight, 3, group), inputs)


def test_dead_inputs_and_group_size_errors():
    weight, _, hessian = _problem(seed=4)
    hessian[5, :] = hessian[:, 5] = 0.0  # an input that is always zero
    variants = gptq_quantize(weight, hessian, [4], group_size=32)
    assert torch.isfinite(variants[4].scale).all() and (variants[4].qweight[:, 5] == 0).all()
    with pytest.raises(ValueError, match="group_size 48 does not divide"):
        gptq_quantize(weight, hessian, [4], group_size=48)


def test_scales_in_bfloat16_reproduce_the_solve():
    weight, _, hessian = _problem(seed=5)
    variant = gptq_quantize(weight, hessian, [4], group_size=32, scale_dtype=torch.bfloat16)[4]
    assert variant.scale.dtype == torch.bfloat16
    approx = dequantize(variant.qweight, variant.scale, torch.bfloat16)
    # Re-quantizing the stored weights with the stored scales gives back the stored integers.
    requantized = torch.round(approx.float().unflatten(1, (4, 32)) / variant.scale.float().unsqueeze(-1)).flatten(1)
    assert torch.equal(requantized.to(torch.int8), variant.qweight)


@pytest.mark.parametrize("act_order", [False, True])
def test_all_zero_groups_in_float16_quantize_to_zero_not_nan(act_order):
    weight, inputs, hessian = _problem(seed=6)
    weight[1] = 0.0  # a pruned output channel
    weight[2, :32] = 1e-7  # a group too small for float16 scales
    variants = gptq_quantize(weight, hessian, [4, 8], group_size=32, act_order=act_order, scale_dtype=torch.float16)
    for variant in variants.values():
        approx = dequantize(variant.qweight, variant.scale, torch.float16)
        assert torch.isfinite(approx).all() and (variant.scale > 0).all() and variant.error == variant.error
        assert not variant.qweight[1].any() and not approx[1].any()
        # the error stored is that of the weight the model computes with (rounded to float16)
        assert variant.error == pytest.approx(_output_error(weight, approx.float(), inputs), rel=1e-3)


def test_per_row_scales_solve_in_lazy_blocks_like_one_block():
    weight, _, hessian = _problem(columns=256, seed=7)
    lazy = gptq_quantize(weight, hessian, [3], group_size=None)[3]
    whole = gptq_quantize(weight, hessian, [3], group_size=None, block_size=256)[3]
    assert torch.equal(lazy.scale, whole.scale)
    assert (lazy.qweight != whole.qweight).float().mean() < 0.002  # float rounding of the update order only


def test_a_hessian_with_inf_or_nan_is_a_clear_error():
    weight, _, hessian = _problem(seed=8)
    hessian[3, 3] = float("inf")
    with pytest.raises(ValueError, match="Hessian holds inf or NaN"):
        gptq_quantize(weight, hessian, [4], group_size=32)
