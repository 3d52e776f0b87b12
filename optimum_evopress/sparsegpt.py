"""SparseGPT at several sparsities at once, from one Hessian and one factorisation.

SparseGPT (Frantar & Alistarh, 2023) prunes a linear layer's weight column block by column block:
in each block of `block_size` columns it zeroes the weights with the smallest OBS saliency
w² / [H⁻¹]ᵢᵢ² and moves the error of every zeroed weight onto the columns not yet processed, using
the inverse Hessian H = 2 X Xᵀ / n of the layer's inputs. Rows are independent given H⁻¹, so the
copies of the weight for every requested sparsity are stacked along the rows and solved together:
one damping, one Cholesky factorisation, one column loop. Each copy gets exactly its own number of
zeros (chosen per block in proportion, the remainder in the last block), so a level's sparsity is
exact in weights.

Variants are stored compactly: a bit mask of the kept weights (`pack_mask`) and the kept values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["SparseVariant", "sparsegpt_prune", "pack_mask", "unpack_mask", "encode_sparse", "decode_sparse"]

_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Packs a boolean tensor into uint8, 8 entries per byte (little-endian bit order), flattened."""
    flat = mask.reshape(-1).to(torch.int32)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_mask`."""
    numel = 1
    for size in shape:
        numel *= int(size)
    bits = (packed.to(torch.int32).unsqueeze(1) // _BIT_WEIGHTS.to(packed.device)) % 2
    return bits.reshape(-1)[:numel].to(torch.bool).view(*shape)


def encode_sparse(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A pruned weight as its mask of nonzeros (packed bits) and the nonzero values, in its dtype."""
    mask = weight != 0
    return {"mask": pack_mask(mask).cpu(), "values": weight[mask].contiguous().cpu()}


def decode_sparse(mask: torch.Tensor, values: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `encode_sparse`."""
    keep = unpack_mask(mask, shape)
    weight = torch.zeros(*shape, dtype=values.dtype, device=values.device)
    weight[keep] = values
    return weight


@dataclass
class SparseVariant:
    """One sparsity level of one layer: the pruned (and OBS-updated) weight and its output error.

    `error` is ‖(W − Ŵ) X‖² / ‖W X‖² on the calibration inputs, computed from the Hessian.
    """

    zeros: int
    weight: torch.Tensor  # (out, in), in the requested dtype, exactly `zeros` zeros
    error: float


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, zeros: Sequence[int], damp: float = 0.01,
                    block_size: int = 128, dtype: torch.dtype | None = None) -> dict[int, SparseVariant]:
    """Prunes `weight` (out, in) to each count of zeros in `zeros` with SparseGPT, sharing one factorisation.

    Args:
        weight: the layer's weight.
        hessian: 2 X Xᵀ / n of the layer's inputs, (in, in), e.g. from `HessianAccumulator`.
        zeros: numbers of weights to zero, each in [0, weight.numel()).
        damp: fraction of the mean Hessian diagonal added to the diagonal before factorising.
        block_size: columns whose mask is chosen together (SparseGPT's adaptive mask selection).
        dtype: dtype of the returned weights (default: the weight's). Rounding to it never turns a
            kept weight into zero: such weights are set to the dtype's smallest step of the same sign.
    """
    rows, columns = weight.shape
    numel = rows * columns
    if any(not 0 <= z < numel for z in zeros):
        raise ValueError(f"sparsegpt_prune: zeros must lie in [0, {numel}) for a {rows}x{columns} weight, got "
                         f"{list(zeros)}")
    dtype = dtype or weight.dtype
    device = hessian.device
    original = weight.to(device, torch.float32)
    copies = len(zeros)

    H = hessian.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W = original.clone()
    W[:, dead] = 0.0
    W = W.repeat(copies, 1)  # rows of level k are W[k*rows:(k+1)*rows]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    H_inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(H_inv, upper=True)

    # Zeros per (level, column block): proportional to the block's width, remainders in the last block.
    bounds = list(range(0, columns, block_size)) + [columns]
    quota = torch.zeros(copies, len(bounds) - 1, dtype=torch.long)
    for k, z in enumerate(zeros):
        done = 0
        for b in range(len(bounds) - 1):
            end = z if b == len(bounds) - 2 else (z * bounds[b + 1]) // columns
            quota[k, b] = end - done
            done = end

    mask = torch.zeros_like(W, dtype=torch.bool)  # True where pruned
    for b, (i1, i2) in enumerate(zip(bounds[:-1], bounds[1:])):
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        saliency = W1 ** 2 / torch.diag(U1).unsqueeze(0) ** 2
        block_mask = torch.zeros_like(W1, dtype=torch.bool)
        for k in range(copies):
            count = int(quota[k, b])
            if count:
                part = saliency[k * rows:(k + 1) * rows]
                chosen = torch.topk(part.reshape(-1), count, largest=False).indices
                block_mask[k * rows:(k + 1) * rows].view(-1)[chosen] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            q = w.masked_fill(block_mask[:, i], 0.0)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            errors[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = block_mask
        W[:, i2:] -= errors @ U[i1:i2, i2:]

    H0 = hessian.to(torch.float32)
    reference = torch.sum((original @ H0) * original).clamp_min(1e-30)
    variants = {}
    tiny = torch.finfo(dtype).tiny
    for k, z in enumerate(zeros):
        pruned = W[k * rows:(k + 1) * rows]
        keep = ~mask[k * rows:(k + 1) * rows]
        out = pruned.to(dtype)
        # A kept weight that rounds to zero in `dtype` would add a zero the budget does not count.
        vanished = keep & (out == 0)
        if vanished.any():
            out[vanished] = torch.where(pruned[vanished] < 0, -tiny, tiny).to(dtype)
        out[~keep] = 0
        delta = original - out.float()
        error = float(torch.sum((delta @ H0) * delta) / reference)
        variants[int(z)] = SparseVariant(zeros=int(z), weight=out.cpu(), error=error)
    return variants
