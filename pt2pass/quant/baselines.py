"""Baselines: round-to-nearest TWN ternary (no calibration) and GPTQ (IST-DASLab/gptq)."""
from __future__ import annotations

import time
from typing import Optional, Tuple

import torch

from .hessian import cholesky_inverse_damped, prepare_hessian
from .result import QuantResult, finish, n_blocks

Tensor = torch.Tensor


def _check_groups(W: Tensor, group_size: int) -> Tuple[int, int]:
    if W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"W must be a non-empty 2-D (out_features, in_features) matrix, "
                         f"got {tuple(W.shape)}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"block_size={group_size!r} must be a positive integer")
    return W.shape


def rtn_ternary(W: Tensor, block_size: int) -> QuantResult:
    """Symmetric TWN ternary per row per block, no calibration: Delta = 0.7 mean|W|,
    T = sign(W) [|W| > Delta], alpha = mean of |W| over the kept entries (0 if none), mu = 0.
    The last block is partial when block_size does not divide in_features."""
    t0 = time.perf_counter()
    _check_groups(W, block_size)
    W = W.detach().to(torch.float32)
    Ts, alphas = [], []
    for Wb in W.split(block_size, dim=1):
        A = Wb.abs()
        kept = A > 0.7 * A.mean(1, keepdim=True)
        Ts.append((torch.sign(Wb) * kept).to(torch.int8))
        alphas.append((A * kept).sum(1) / kept.sum(1).clamp_min(1))
    T, alpha = torch.cat(Ts, 1), torch.stack(alphas, 1)
    stats = {"method": "rtn"}
    res = finish(W, None, T, alpha, torch.zeros_like(alpha), None, stats, block_size)
    res.stats["seconds"] = time.perf_counter() - t0
    return res


def minmax_params(x: Tensor, maxq: int) -> Tuple[Tensor, Tensor]:
    """GPTQ's asymmetric per-row quantizer on a group x (n, g), the range widened to include 0
    (all-zero rows get [-1, 1]): scale = (xmax - xmin) / maxq, zero = round(-xmin / scale).
    Returned as the (alpha, mu) of the ternary format: Q = alpha q + mu, alpha = scale,
    mu = -zero * scale, q = clamp(round(x / scale) + zero, 0, maxq)."""
    xmin = x.min(1).values.clamp(max=0)
    xmax = x.max(1).values.clamp(min=0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both0, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both0, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, -zero * scale


def gptq_quantize(W: Tensor, H: Optional[Tensor], bits: int = 2, group_size: int = 128,
                  damp: float = 0.01, act_order: bool = False) -> QuantResult:
    """GPTQ (Frantar et al., IST-DASLab/gptq ``fasterquant``): asymmetric min-max ``bits``-bit,
    one (scale, zero) per row per group of ``group_size`` columns, columns quantized one by one
    with the OBS update through U = upper Cholesky of Hinv, lazily batched per group.

    The last group is partial when group_size does not divide in_features.
    Same as the reference with blocksize = group_size (lazy batching does not change the math),
    float32 throughout; act_order permutes columns by descending diag(H) and the groups are then
    consecutive in the permuted order (perm is returned). Group parameters are found on the
    current (compensated) columns at the group's start, as in the reference. Result: T = codes
    q in [0, 2^bits - 1] (uint8), alpha = scale, mu = -zero * scale, Q = alpha q + mu.
    """
    t0 = time.perf_counter()
    n, m = _check_groups(W, group_size)
    if H is None:
        raise ValueError("gptq_quantize needs the calibration Hessian H (got None)")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be in 1..8 (codes are stored as uint8)")
    Wc, Hd, n_dead = prepare_hessian(W.detach(), H.detach(), damp, dtype=torch.float32,
                                     dead_diagonal=1.0)  # the reference's stand-in
    perm = torch.argsort(torch.diagonal(Hd), descending=True, stable=True) if act_order else None
    if perm is not None:
        Wc, Hd = Wc[:, perm], Hd[perm.unsqueeze(1), perm]
    U = torch.linalg.cholesky(cholesky_inverse_damped(Hd), upper=True)
    maxq = 2 ** bits - 1
    codes = torch.zeros(n, m, dtype=torch.uint8, device=Wc.device)
    alpha = torch.zeros(n, n_blocks(m, group_size), device=Wc.device)
    mu = torch.zeros_like(alpha)
    for g, i1 in enumerate(range(0, m, group_size)):
        i2 = min(i1 + group_size, m)
        scale, off = minmax_params(Wc[:, i1:i2], maxq)
        alpha[:, g], mu[:, g] = scale, off
        q, Err = _gptq_group(Wc[:, i1:i2].clone(), U[i1:i2, i1:i2], scale, off, maxq)
        codes[:, i1:i2] = q
        Wc[:, i2:] -= Err @ U[i1:i2, i2:]
    stats = {"method": "gptq", "bits": bits, "n_dead_columns": n_dead}
    res = finish(W.to(torch.float32), H, codes, alpha, mu, perm, stats, group_size)
    res.stats["seconds"] = time.perf_counter() - t0
    return res


def _gptq_group(W1: Tensor, U1: Tensor, scale: Tensor, off: Tensor, maxq: int):
    """GPTQ's inner column loop on one group: q_j, err_j = (w_j - Q_j) / U[j,j], and the later
    columns of the group absorb err_j U[j, j:]. Returns (codes uint8, Err (n, g))."""
    zero = -off / scale
    Err = torch.zeros_like(W1)
    q = torch.zeros(W1.shape, dtype=torch.uint8, device=W1.device)
    for j in range(W1.shape[1]):
        w = W1[:, j]
        qj = torch.clamp(torch.round(w / scale) + torch.round(zero), 0, maxq)
        err = (w - (scale * qj + off)) / U1[j, j]
        W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
        Err[:, j] = err
        q[:, j] = qj.to(torch.uint8)
    return q, Err
