"""Column orders for the blockwise loop: Structural Similarity-based Reordering (SSR) and the
static orders "natural" and "act_order" (METHOD.md §4).

SSR is dynamic: before each block, among the remaining (already error-compensated) columns of W,
take w_bar = their mean and pick the ``block_size`` columns with the highest *signed* cosine
similarity cos(W[:, j], w_bar). Columns that point the same way share a row-wise grid well.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def cosine_to_mean(Wr: Tensor) -> Tensor:
    """cos(W[:, j], w_bar) for every column j of ``Wr`` (n, k), w_bar = mean of its columns.

    Zero columns (and a zero mean) give 0, never NaN: the norms are clamped away from 0 and a
    zero vector stays zero after normalisation.
    """
    tiny = torch.finfo(Wr.dtype).tiny
    wbar = Wr.mean(1)
    wbar = wbar / wbar.norm().clamp_min(tiny)
    cols = Wr / Wr.norm(dim=0, keepdim=True).clamp_min(tiny)
    return wbar @ cols


def next_block(W: Tensor, remaining: Tensor, block_size: int) -> Tensor:
    """The next SSR block: the ``block_size`` indices of ``remaining`` (indices into W's columns)
    whose columns have the highest signed cosine similarity to the mean of the remaining columns.

    The last block takes all that remains. Ties (e.g. zero columns, all cos = 0) go to the
    earlier position in ``remaining`` (stable sort), so the result is deterministic. The block is
    returned sorted ascending (the order inside a block does not change the quantization, and
    ascending indices make the final permutation friendlier to gathers).
    """
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be positive")
    remaining = torch.as_tensor(remaining, dtype=torch.long, device=W.device)
    if remaining.numel() <= block_size:
        return remaining.sort().values
    cos = cosine_to_mean(W[:, remaining])
    pick = torch.argsort(cos, descending=True, stable=True)[:block_size]
    return remaining[pick].sort().values


def static_order(order: str, m: int, H: Optional[Tensor] = None) -> Tensor:
    """A full static column order: "natural" = arange(m); "act_order" = descending diag(H)
    (stable, so equal diagonals keep their natural order). SSR has no static order."""
    device = H.device if H is not None else None
    if order == "natural":
        return torch.arange(m, device=device)
    if order == "act_order":
        if H is None:
            raise ValueError("order='act_order' needs the Hessian H (descending diag(H))")
        return torch.argsort(torch.diagonal(H), descending=True, stable=True)
    raise ValueError(f"order={order!r} has no static column order; allowed: 'natural', 'act_order'")
