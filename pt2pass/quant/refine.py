"""Refining T inside a block with the Hessian (beyond the paper; METHOD.md §8's first question).

PT²-LLM fixes T by ITF (weight error only) and then aligns the grid (AGA). With exact
compensation, the true cost of a block's error E = W_B − Q_B, once the not-yet-quantized columns
are optimally compensated, is tr(E C Eᵀ) with C = Hinv[B,B]⁻¹ (the Schur complement of H). Both
halves of that objective have cheap exact or greedy minimisers:

- for a fixed grid (α, μ), T column by column in GPTQ's way: round column j to the row's grid,
  then spread its error over the block's later columns through the upper Cholesky factor U of
  Hinv[B,B] (Hinv[B,B] = UᵀU). This greedy sweep is what makes GPTQ beat round-to-nearest;
- for a fixed T, (α, μ) by the same 2×2 solve as AGA, against C.

``refine_block`` alternates the two for a few rounds, keeping a round only if it lowers the cost,
so it can never do worse than ITF + AGA. It uses the calibration Hessian as GPTQ does; AGA's
concern about overfitting T to the calibration set is the same trade-off GPTQ makes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .hessian import mask_dead
from .ternary import aga, canonicalize, dequant


def block_cost(WB: Tensor, QB: Tensor, C: Tensor) -> float:
    """tr(E C Eᵀ), E = WB − QB: the layer-loss increase of this block after compensation."""
    E = (WB - QB).double()
    return float(((E @ C.double()) * E).sum())


def sweep(WB: Tensor, alpha: Tensor, mu: Tensor, U: Tensor) -> Tensor:
    """GPTQ-style greedy rounding of WB (n, b) to each row's grid {μ−α, μ, μ+α}, columns in order,
    each column's error compensated on the later columns of the block through U."""
    W = WB.double().clone()
    a, m, U = alpha.double(), mu.double(), U.double()
    safe = torch.where(a > 0, a, torch.ones_like(a))
    T = torch.zeros(W.shape, dtype=torch.int8, device=W.device)
    for j in range(W.shape[1]):
        t = torch.where(a > 0, torch.clamp(torch.round((W[:, j] - m) / safe), -1, 1),
                        torch.zeros_like(a))
        T[:, j] = t.to(torch.int8)
        err = (W[:, j] - (a * t + m)) / U[j, j]
        W[:, j + 1:] -= err.unsqueeze(1) * U[j, j + 1:].unsqueeze(0)
    return T


def refine_block(WB: Tensor, T: Tensor, alpha: Tensor, mu: Tensor, Hinv_BB: Tensor,
                 rounds: int, live: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Alternate :func:`sweep` (T) and AGA against C = Hinv_BB⁻¹ (α, μ) for ``rounds`` rounds.

    Returns (T, alpha, mu, rounds_kept). Rounds that do not lower tr(E C Eᵀ) are discarded.
    ``live``: the columns whose input is not always 0 (None: all); C gives the others no weight.
    """
    U = torch.linalg.cholesky(Hinv_BB.double(), upper=True)
    C = mask_dead(torch.cholesky_inverse(U, upper=True), live)
    best = block_cost(WB, dequant(T, alpha, mu), C)
    kept = 0
    for _ in range(rounds):
        T_new = sweep(WB, alpha, mu, U)
        a_new, m_new = aga(WB, T_new, C)
        T_new, a_new = canonicalize(T_new, a_new)
        a_new, m_new = a_new.to(alpha.dtype), m_new.to(mu.dtype)
        cost = block_cost(WB, dequant(T_new, a_new, m_new), C)
        if not cost < best:
            break
        T, alpha, mu, best, kept = T_new, a_new, m_new, cost, kept + 1
    return T, alpha, mu, kept
