"""GPTQ for several bit-widths at once, from one Hessian and one factorisation.

GPTQ (Frantar et al., 2022) quantizes a linear layer's weight column by column and spreads each
column's rounding error over the columns not yet quantized, using the inverse Hessian
H = 2 X Xᵀ / n of the layer's inputs X. Every row of the weight is solved independently with the
same inverse Hessian, so the copies of the weight for all requested bit-widths are stacked along
the rows and solved in one pass: one damping, one Cholesky factorisation, one column loop.

Quantization is symmetric integer with one scale per row and group of `group_size` input columns
(`scale = absmax / ((2^b - 1) / 2)`, values clamped to [-2^(b-1), 2^(b-1) - 1]): exactly what
compressed-tensors' `pack-quantized` format stores, so exported weights dequantize bit for bit
to the weights the search scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["HessianAccumulator", "QuantizedVariant", "gptq_quantize", "dequantize", "symmetric_range"]


def symmetric_range(bits: int) -> tuple[int, int]:
    """The integer range of a symmetric `bits`-bit weight: [-2^(b-1), 2^(b-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class HessianAccumulator:
    """Accumulates H = 2 X Xᵀ / n over batches of a layer's inputs (any leading shape, last dim = features)."""

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.count = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.sum.device, torch.float32)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("HessianAccumulator: no inputs were seen")
        return self.sum * (2.0 / self.count)


@dataclass
class QuantizedVariant:
    """One bit-width of one layer: integer values, per-group scales and the normalised output error.

    `error` is ‖(W − Ŵ) X‖² / ‖W X‖² on the calibration inputs, computed from the Hessian.
    """

    bits: int
    qweight: torch.Tensor  # int8, shape (out, in)
    scale: torch.Tensor  # float32, shape (out, in // group_size)
    error: float


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ = q · scale, computed as compressed-tensors does when it loads the checkpoint: in `dtype`."""
    scale = scale.to(dtype)
    group_size = qweight.shape[1] // scale.shape[1]
    q = qweight.to(dtype).unflatten(-1, (scale.shape[1], group_size))
    return (q * scale.unsqueeze(-1)).flatten(-2)


def _group_scales(weight: torch.Tensor, qmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric scales for `weight` (rows, columns of one group): absmax / ((2^b - 1) / 2), per row, rounded to
    `dtype` (returned in float32). A scale that is zero there (an all-zero group, or one below float16's
    smallest subnormal) becomes the smallest normal number of `dtype`, so a zero weight quantizes to 0, not
    0 / 0 (with act_order, GPTQ's updates may still fill such a group with tiny values)."""
    absmax = weight.abs().amax(dim=1)
    scale = (absmax / (qmax.squeeze(1) + 0.5)).to(dtype)
    return torch.where(scale > 0, scale, torch.finfo(dtype).tiny).float()


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: Sequence[int], group_size: int | None = 128,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  scale_dtype: torch.dtype = torch.float32, keep_zeros: bool = False) -> dict[int, QuantizedVariant]:
    """Quantizes `weight` (out, in) at every bit-width in `bits` with GPTQ, sharing one factorisation.

    Args:
        weight: the layer's weight, (out_features, in_features).
        hessian: 2 X Xᵀ / n of the layer's inputs, (in_features, in_features), e.g. from `HessianAccumulator`.
        bits: bit-widths to produce, each in 2..8.
        group_size: input columns sharing one scale; `None` for one scale per output row.
        act_order: quantize columns in order of decreasing Hessian diagonal. Group scales are then fixed
            from the unquantized weight before the solve ("static groups"), so the stored layout is unchanged.
        damp: fraction of the mean Hessian diagonal added to the diagonal before factorising.
        block_size: columns updated together (lazy batch updates); rounded up to a multiple of `group_size`
            when group scales are computed during the solve.
        scale_dtype: the dtype scales are stored in; the solve rounds with scales in this dtype, so the
            stored integers and scales reproduce its result exactly.
        keep_zeros: weights that are exactly zero stay zero (integer 0) and the error of every other weight
            is compensated on the nonzero weights only, as SparseGPT quantizes a pruned layer.
    """
    rows, columns = weight.shape
    group = group_size or columns
    if columns % group:
        raise ValueError(f"group_size {group_size} does not divide the layer's {columns} input features")
    device = hessian.device
    original = weight.to(device, torch.float32)
    n_bits = len(bits)
    qmax = torch.tensor([symmetric_range(b)[1] for b in bits], dtype=torch.float32, device=device)
    qmax = qmax.repeat_interleave(rows).unsqueeze(1)  # one entry per stacked row
    qmin = -qmax - 1

    H = hessian.to(torch.float32).clone()
    if not torch.isfinite(H).all():
        raise ValueError("GPTQ: the layer's Hessian holds inf or NaN (its calibration inputs overflowed; try "
                         "EvoPressConfig.dtype='bfloat16' or 'float32')")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W = original.clone()
    W[:, dead] = 0.0
    W = W.repeat(n_bits, 1)  # rows of bit-width k are W[k*rows:(k+1)*rows]
    keep = (original != 0).repeat(n_bits, 1) if keep_zeros else torch.ones_like(W, dtype=torch.bool)

    scales = torch.empty(n_bits * rows, columns // group, dtype=torch.float32, device=device)
    # Static scales are fixed before the solve: with act_order (from the unquantized weight), and with one scale
    # per row (from the row as it is at column 0, before any update: the same either way).
    static = act_order or group == columns
    if static:
        for g in range(columns // group):
            columns_g = slice(g * group, (g + 1) * group)
            scales[:, g] = _group_scales(W[:, columns_g] * keep[:, columns_g], qmax, scale_dtype)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H, keep = W[:, perm], H[perm][:, perm], keep[:, perm]
        group_of = perm // group
    else:
        perm = None
        group_of = torch.arange(columns, device=device) // group

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    factor = torch.linalg.cholesky(H)
    H_inv = torch.cholesky_inverse(factor)
    U = torch.linalg.cholesky(H_inv, upper=True)  # upper factor of H^-1: row i holds the update for column i

    Q = torch.zeros_like(W)
    if not static:  # a group's scales come from its columns as updated so far: the group lies inside one block
        block_size = max(block_size, group)
        block_size += -block_size % group
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        errors = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if not static and column % group == 0:
                # Scales of a group come from its columns as updated so far (the group lies inside this block).
                scales[:, column // group] = _group_scales(W1[:, i:i + group] * keep[:, column:column + group],
                                                           qmax, scale_dtype)
            scale = scales[:, group_of[column]]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale), qmin[:, 0], qmax[:, 0]) * keep[:, column]
            Q[:, column] = q
            err = (w - q * scale) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            errors[:, i] = err
        W[:, i2:] -= errors @ U[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    H0 = hessian.to(torch.float32)
    reference = torch.sum((original @ H0) * original).clamp_min(1e-30)
    variants = {}
    for k, b in enumerate(bits):
        q = Q[k * rows:(k + 1) * rows]
        s = scales[k * rows:(k + 1) * rows]
        # The error of the weight the model computes with: q · scale rounded to the model's dtype.
        delta = original - dequantize(q, s, scale_dtype).float()
        error = float(torch.sum((delta @ H0) * delta) / reference)
        variants[b] = QuantizedVariant(bits=b, qweight=q.to(torch.int8).cpu(), scale=s.to(scale_dtype).cpu(),
                                       error=error)
    return variants
