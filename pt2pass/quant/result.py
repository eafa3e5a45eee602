"""The result of quantizing one Linear weight, shared by PT²-LLM and the baselines."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass
class QuantResult:
    """One quantized weight W (n, m) in blocks (groups) of ``bs = block_size`` columns.

    Block b is made of the original columns ``perm[b*bs:(b+1)*bs]`` (``arange`` if perm is None),
    the last block is partial when bs does not divide m (as in ``pt2pass.lowering.format``), and
    ``Q[:, perm] = alpha_b * T + mu_b`` blockwise (see :func:`dequantize_blocks`).
    """

    T: Tensor
    """int8 (n, m) ternary codes in {-1, 0, 1} (for the "gptq" baseline: integer codes q in
    [0, 2^bits - 1], uint8), columns in quantization order, i.e. W[:, perm] order."""
    alpha: Tensor
    """float32 (n, ceil(m / bs)): the per-row per-block scale (>= 0 for the ternary methods)."""
    mu: Tensor
    """float32 (n, ceil(m / bs)): the per-row per-block offset."""
    perm: Optional[Tensor]
    """int64 (m,) column order, or None for the natural order."""
    Q: Tensor
    """float32 (n, m): the dequantized weight in the ORIGINAL column order."""
    stats: dict = field(default_factory=dict)
    """Plain floats/ints describing the run (errors, iterations, order statistics, seconds)."""
    block_size: int = 0
    """Columns per block (alpha/mu group)."""


def n_blocks(m: int, block_size: int) -> int:
    return -(-m // block_size)


def dequantize_blocks(T: Tensor, alpha: Tensor, mu: Tensor, block_size: int) -> Tensor:
    """float32 ``alpha_b * T + mu_b`` per block of columns, in T's (permuted) column order.

    The one definition of the blockwise grid: the packed format's dequantize and the passes use it
    too, so all agree bit for bit. Scales (n, n_blocks) are broadcast over each block rather than
    materialised per column (the CPU reference's hot path); the last block may be partial."""
    n, m = T.shape
    a, b = alpha.to(torch.float32), mu.to(torch.float32)
    full = (m // block_size) * block_size
    nf = full // block_size
    Q = (T[:, :full].to(torch.float32).view(n, nf, block_size) * a[:, :nf, None]
         + b[:, :nf, None]).view(n, full)
    if full == m:
        return Q
    return torch.cat([Q, T[:, full:].to(torch.float32) * a[:, nf:] + b[:, nf:]], dim=1)


def unpermute(Qp: Tensor, perm: Optional[Tensor]) -> Tensor:
    """Columns of ``Qp`` (in perm order) put back in the original order: Q[:, perm] = Qp."""
    if perm is None:
        return Qp
    Q = torch.empty_like(Qp)
    Q[:, perm] = Qp
    return Q


def order_stats(perm: Optional[Tensor], m: int, block_size: int) -> dict:
    """How far an order is from the natural one: mean |position shift| of the columns, and the
    fraction of blocks whose column set differs from the natural block at that position."""
    if perm is None:
        return {"mean_abs_shift": 0.0, "frac_blocks_reordered": 0.0}
    ar = torch.arange(m, device=perm.device)
    shift = (perm - ar).abs().double().mean()
    moved = [not torch.equal(p.sort().values, a)
             for p, a in zip(perm.split(block_size), ar.split(block_size))]
    return {"mean_abs_shift": float(shift), "frac_blocks_reordered": sum(moved) / len(moved)}


def finish(W: Tensor, H: Optional[Tensor], T: Tensor, alpha: Tensor, mu: Tensor,
           perm: Optional[Tensor], stats: dict, block_size: int) -> QuantResult:
    """Build the QuantResult: float32 scales, Q from exactly those values, layer-level errors
    E_w = ||W - Q||^2 and (if H is given) E_x = tr((W - Q) H (W - Q)^T) against the original W."""
    if perm is not None and torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
        perm = None
    alpha, mu = alpha.to(torch.float32).contiguous(), mu.to(torch.float32).contiguous()
    Q = unpermute(dequantize_blocks(T, alpha, mu, block_size), perm)
    E = W.double() - Q.double()
    stats["E_w"] = float(E.square().sum())
    if H is not None:
        stats["E_x"] = float(((E @ H.to(E.device, torch.float64)) * E).sum())
    stats.update(order_stats(perm, W.shape[1], block_size))
    return QuantResult(T.contiguous(), alpha, mu, perm, Q, stats, block_size)
