"""The GPTQ-style blockwise loop of PT²-LLM (METHOD.md §5): :func:`ternarize_weight`.

Columns are quantized one block of ``block_size`` at a time, in the order ``config.order``. For
each block B (columns of the current, error-compensated W): T, alpha, mu = ITF(W[:, B]);
alpha, mu = AGA(W[:, B], T, H[B, B]); Q_B = alpha T + mu; E = W[:, B] - Q_B; then the remaining
columns R absorb the error ("compensation"):

- "exact" (optimal brain surgeon for a block, any order): with Hinv the inverse of the damped H
  restricted to the columns not yet quantized (B and R),
      W[:, R]   -= E Hinv[B,B]^-1 Hinv[B,R]
      Hinv[R,R] -= Hinv[R,B] Hinv[B,B]^-1 Hinv[B,R]     (= (H[R,R])^-1, the Schur complement)
  so that W[:, R] is the least-squares refit min ||(W - W') X^T|| given the quantized columns.
- "diagonal" (cheaper; no m x m downdate):
  * static orders ("natural", "act_order"): GPTQ's form. H is permuted into the order once,
    U = upper Cholesky factor of H^-1 (Hinv = U^T U); per block W[:, R] -= (E U[B,B]^-1) U[B,R]
    (a triangular solve). For a static order this is *the same* update as "exact" (the rows of U
    carry the already-downdated Hinv), at O(m^3/3) once instead of a downdate per block.
  * "ssr" (order unknown up front): the Hinv of the full damped H is never downdated, and each
    block applies W[:, R] -= E Hinv[B,B]^-1 Hinv[B,R] with that stale Hinv. This is exact for the
    first block only; later blocks ignore that the already-quantized columns are frozen. Measured
    on six SmolLM2 layers it gives 1.17-1.45x the layer E_x of "exact" (still below "none", which
    is 1.4-2.1x), so it is only a speed/quality trade-off, and the saving is small: the exact
    downdate costs ~m^3 flops over the whole loop, about as much as the initial Cholesky.
- "none": blocks are quantized independently (H is only needed for AGA / act_order).

When block_size does not divide m, the last block (in quantization order) is partial. H and W are
used in float64 (the downdates lose digits in float32 over tens of blocks); AGA uses the damped,
dead-column-fixed H[B, B]. Everything stays on W's device.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import torch

from ..config import TernaryConfig
from .baselines import gptq_quantize, rtn_ternary
from .hessian import cholesky_inverse_damped, mask_dead, prepare_hessian
from .result import QuantResult, finish, n_blocks
from .refine import refine_block
from .ssr import next_block, static_order
from .ternary import aga, canonicalize, dequant, itf, output_error

log = logging.getLogger(__name__)
Tensor = torch.Tensor

__all__ = ["QuantResult", "ternarize_weight", "obs_update"]


def obs_update(W: Tensor, Hinv: Tensor, B: Tensor, R: Tensor, E: Tensor):
    """Exact block OBS step on the not-yet-quantized columns: W (n, k) and Hinv (k, k) hold them,
    B and R index them (the block just quantized with error E (n, |B|), and the rest). Returns
    (W[:, R] - E Hinv[B,B]^-1 Hinv[B,R],  Hinv[R,R] - Hinv[R,B] Hinv[B,B]^-1 Hinv[B,R])."""
    Hbb = Hinv[B.unsqueeze(1), B]
    Hbr = Hinv[B.unsqueeze(1), R]
    L, info = torch.linalg.cholesky_ex(Hbb)
    if int(info) == 0:
        G = torch.cholesky_solve(Hbr, L)  # Hinv[B,B]^-1 Hinv[B,R], no explicit inverse
    else:
        log.warning("Hinv[B,B] is not numerically positive definite; using a least-squares solve")
        G = torch.linalg.lstsq(Hbb, Hbr).solution
    W_R = W[:, R] - E @ G
    H_RR = Hinv[R.unsqueeze(1), R] - Hbr.t() @ G
    return W_R, 0.5 * (H_RR + H_RR.t())  # re-symmetrise: rounding drifts over many blocks


def _validate(W: Tensor, H: Optional[Tensor], config: TernaryConfig) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D (out_features, in_features) matrix, got {tuple(W.shape)}")
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"W of shape {tuple(W.shape)} is empty")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W contains NaN/Inf")
    needs_h = config.method == "gptq" or (config.method == "pt2" and (
        config.aga or config.compensation != "none" or config.order == "act_order"))
    if needs_h and H is None:
        raise ValueError(f"H is None but method={config.method!r}, aga={config.aga}, "
                         f"compensation={config.compensation!r}, order={config.order!r} need it")


AGA_METRICS = ("block", "schur")


def ternarize_weight(W: Tensor, H: Optional[Tensor], config: Optional[TernaryConfig] = None,
                     aga_metric: str = "block") -> QuantResult:
    """Quantize one Linear weight W (n, m) with calibration Hessian H (m, m) (may be None for
    method="rtn", or for compensation="none" without AGA and without act_order).

    Blocks hold ``config.block_size`` columns; when that does not divide m, the last block (in
    quantization order) is partial, as ``pt2pass.lowering.format`` stores it.

    method "rtn" -> :func:`rtn_ternary`; "gptq" -> :func:`gptq_quantize` (``bits``, groups of
    ``block_size``, act_order iff order == "act_order"). W may be float32/bf16/fp16 (upcast).
    stats: E_w_itf, E_x_itf, E_w_aga, E_x_aga (per-block errors of the compensated W summed over
    blocks; the E_x use H[B,B]; E_x keys only when H is given, *_aga only when AGA runs),
    itf_iters_mean/max, E_w_itf_history (the layer's E_w after ITF's init and each iteration,
    blocks summed), n_sign_flips (AGA rows given alpha >= 0 by flipping T), n_dead_columns,
    E_w/E_x of the whole layer vs the original W and H, mean_abs_shift, frac_blocks_reordered,
    seconds.

    ``aga_metric`` (beyond the paper; needs compensation="exact"): "block" (default, METHOD.md)
    aligns the grid against C = H[B,B]; "schur" against C = Hinv[B,B]^-1 = H[B,B] - H[B,R]
    H[R,R]^-1 H[R,B] (R = the not-yet-quantized columns), which is exactly the layer-loss increase
    E C E^T that a block error E costs once R is optimally compensated. The stats' block E_x then
    use that C too.
    """
    config = config or TernaryConfig()
    _validate(W, H, config)
    if aga_metric not in AGA_METRICS or (aga_metric == "schur" and config.compensation != "exact"):
        raise ValueError(f"aga_metric={aga_metric!r} is not supported with compensation="
                         f"{config.compensation!r}; allowed: 'block', or 'schur' with 'exact'")
    if config.method == "rtn":
        return rtn_ternary(W, config.block_size)
    if config.method == "gptq":
        return gptq_quantize(W, H, config.bits, config.block_size, config.damp,
                             act_order=config.order == "act_order")
    t0 = time.perf_counter()
    W = W.detach()
    if H is None:
        Wc, Hd, n_dead = W.to(torch.float64).clone(), None, 0
    else:
        Wc, Hd, n_dead = prepare_hessian(W, H.detach(), config.damp)
    live = torch.diagonal(H.detach()).to(Wc.device) != 0 if H is not None and n_dead else None
    T, alpha, mu, perm, stats = _block_loop(Wc, Hd, config, aga_metric == "schur", live)
    stats.update(method="pt2", n_dead_columns=n_dead)
    res = finish(W.to(torch.float32), H, T, alpha, mu, perm, stats, config.block_size)
    if config.order == "ssr" and H is not None and has_outlier_columns(W):
        res = _guard_ssr(W, H, config, aga_metric, res)
    res.stats["seconds"] = time.perf_counter() - t0
    return res


# A column whose norm exceeds this multiple of the median column norm is an outlier column.
OUTLIER_COLUMN_RATIO = 30.0


def has_outlier_columns(W: Tensor) -> bool:
    """Two or more outlier columns (one alone cannot share a block with another)."""
    norms = W.detach().to(torch.float32).norm(dim=0)
    return int((norms > OUTLIER_COLUMN_RATIO * norms.median()).sum()) >= 2


def _guard_ssr(W: Tensor, H: Tensor, config: TernaryConfig, aga_metric: str,
               res: QuantResult) -> QuantResult:
    """SSR's mean column is dominated by outlier columns, so they all get the highest cosine and
    land in one block, where one 3-level grid per row cannot hold several unrelated huge values:
    with 2-4 columns at 1e3-1e4x the others, E_x came out 14-35000x that of calibration-free
    RTN. On such layers the result is compared with RTN and, if worse, the layer is re-run in
    the natural order; the best of the three is kept (stats["ssr_fallback"] names it), so the
    layer is never worse than RTN. Layers without outlier columns are untouched."""
    rtn = rtn_ternary(W, config.block_size)
    e_rtn = rtn.stats["E_x"] = output_error(W, rtn.Q, H)
    if res.stats["E_x"] <= e_rtn:
        return res
    natural = ternarize_weight(W, H, dataclasses.replace(config, order="natural"), aga_metric)
    best, name = min((natural, "natural"), (rtn, "rtn"), key=lambda c: c[0].stats["E_x"])
    log.warning("SSR order gave E_x=%.3g > RTN's %.3g on a layer with outlier columns; kept the "
                "%s result (E_x=%.3g)", res.stats["E_x"], e_rtn, name, best.stats["E_x"])
    best.stats["ssr_fallback"] = name
    return best


def _quantize_block(WB: Tensor, C: Optional[Tensor], config: TernaryConfig, acc: dict,
                    Hinv_BB: Optional[Tensor] = None, live_B: Optional[Tensor] = None):
    """ITF, then (optionally) AGA, then (optionally, given Hinv[B,B]) the T refinement of
    refine.py on one block; returns (T, alpha32, mu32, Q_B in WB's dtype). ``live_B``: the block's
    columns whose input is not always 0 (None: all), the only ones AGA's metric weighs."""
    r = itf(WB, config.itf_max_iters)
    T, alpha, mu = r.T, r.alpha.float(), r.mu.float()
    acc["iters"].append(r.iters)
    acc["itf_histories"].append(r.history)
    _add_errors(acc, "itf", WB, dequant(T, alpha, mu), C)
    if config.aga:
        a2, m2 = aga(WB, T, C)
        acc["n_sign_flips"] += int((a2 < 0).sum())
        T, a2 = canonicalize(T, a2)
        alpha, mu = a2.float(), m2.float()
        _add_errors(acc, "aga", WB, dequant(T, alpha, mu), C)
    if config.refine_rounds and Hinv_BB is not None:
        T, alpha, mu, kept = refine_block(WB, T, alpha, mu, Hinv_BB, config.refine_rounds, live_B)
        acc["refine_rounds"] = acc.get("refine_rounds", 0) + kept
        _add_errors(acc, "refined", WB, dequant(T, alpha, mu), C)
    return T, alpha, mu, dequant(T, alpha, mu).to(WB.dtype)


def _add_errors(acc: dict, tag: str, WB: Tensor, QB: Tensor, C: Optional[Tensor]) -> None:
    E = WB.double() - QB.double()
    acc[f"E_w_{tag}"] = acc.get(f"E_w_{tag}", 0.0) + float(E.square().sum())
    if C is not None:
        acc[f"E_x_{tag}"] = acc.get(f"E_x_{tag}", 0.0) + float(((E @ C.double()) * E).sum())


def _block_loop(W: Tensor, Hd: Optional[Tensor], config: TernaryConfig, schur: bool = False,
                live: Optional[Tensor] = None):
    """The sequential loop on the compacted not-yet-quantized columns (``rem`` maps them to W)."""
    n, m = W.shape
    bs, comp, dev = config.block_size, config.compensation, W.device
    static = config.order != "ssr"
    rem = static_order(config.order, m, Hd) if static else torch.arange(m, device=dev)
    Wr = W[:, rem]
    Hinv = cholesky_inverse_damped(Hd[rem.unsqueeze(1), rem]) if comp != "none" else None
    U = torch.linalg.cholesky(Hinv, upper=True) if comp == "diagonal" and static else None
    acc = {"iters": [], "itf_histories": [], "n_sign_flips": 0}
    Ts, alphas, mus, order = [], [], [], []
    for _ in range(n_blocks(m, bs)):
        k = rem.numel()
        B = (torch.arange(min(bs, k), device=dev) if static
             else next_block(Wr, torch.arange(k, device=dev), bs))
        keep = torch.ones(k, dtype=torch.bool, device=dev)
        keep[B] = False
        R = keep.nonzero().squeeze(1)
        cols = rem[B]
        C = Hd[cols.unsqueeze(1), cols] if Hd is not None else None
        if schur:
            C = torch.cholesky_inverse(torch.linalg.cholesky(Hinv[B.unsqueeze(1), B]))
        live_B = live[cols] if live is not None else None
        if C is not None:
            C = mask_dead(C, live_B)
        Hinv_BB = Hinv[B.unsqueeze(1), B] if comp == "exact" else None
        T, alpha, mu, QB = _quantize_block(Wr[:, B], C, config, acc, Hinv_BB, live_B)
        E = Wr[:, B] - QB
        Wr, Hinv, U = _compensate(comp, Wr, Hinv, U, B, R, E)
        Ts.append(T), alphas.append(alpha), mus.append(mu), order.append(cols)
        rem = rem[R]
    iters = acc.pop("iters")
    acc.update(itf_iters_mean=sum(iters) / len(iters), itf_iters_max=max(iters),
               E_w_itf_history=_layer_history(acc.pop("itf_histories")))
    return (torch.cat(Ts, 1), torch.stack(alphas, 1), torch.stack(mus, 1),
            torch.cat(order), acc)


def _layer_history(histories) -> list:
    """E_w of the whole layer after ITF's init and after each iteration: the blocks' histories
    summed, a block that converged early counting with its final value (for the convergence plot;
    the last entry matches E_w_itf up to the float32 rounding of the grid)."""
    length = max(len(h) for h in histories)
    return [sum(h[min(i, len(h) - 1)] for h in histories) for i in range(length)]


def _compensate(comp: str, Wr, Hinv, U, B, R, E):
    """Apply one block's error compensation; returns the new (Wr, Hinv, U) of the rest R."""
    if R.numel() == 0 or comp == "none":
        return Wr[:, R], Hinv, U
    if comp == "exact":
        Wr, Hinv = obs_update(Wr, Hinv, B, R, E)
        return Wr, Hinv, None
    if U is not None:  # diagonal, static order: B is the first rows of U
        bs = B.numel()
        Einv = torch.linalg.solve_triangular(U[:bs, :bs], E, upper=True, left=False)
        return Wr[:, R] - Einv @ U[:bs, bs:], Hinv, U[bs:, bs:]
    # diagonal, SSR: the stale (never downdated) Hinv, indexed in the remaining set
    G = torch.linalg.solve(Hinv[B.unsqueeze(1), B], Hinv[B.unsqueeze(1), R])
    return Wr[:, R] - E @ G, Hinv[R.unsqueeze(1), R], None
