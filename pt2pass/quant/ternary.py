"""The asymmetric ternary quantizer of PT²-LLM for one block of columns, vectorised over rows.

``W`` is one block (n rows, m columns; m is usually 128 but any m >= 1 works). Row i is quantized
to ``Q_i = alpha_i * T_i + mu_i`` with ``T_i`` in {-1, 0, 1}^m (METHOD.md §1-3):

- :func:`atq_init`: TWN-style start, mu = row mean, Delta = 0.75 mean|W - mu|.
- :func:`itf` (Iterative Ternary Fitting): alternate :func:`fit_grid` (exact least squares of
  (alpha, mu) for fixed T) and :func:`round_to_grid` (nearest grid point for fixed (alpha, mu))
  until T stops changing; minimises E_w = ||W - Q||_F^2.
- :func:`aga` (Activation-aware Grid Alignment): exact per-row 2x2 least squares of (alpha, mu)
  for frozen T against E_x = tr((W - Q) C (W - Q)^T), C = H[B, B].

Dtypes: float32 and float64 inputs are computed in their own dtype, anything else is promoted to
float32; the sums that can cancel (the normal equations and the errors) are taken in float64.

Sign convention: ``fit_grid`` and ``aga`` return the unconstrained least-squares solution, so alpha
can come out negative, but only for a T that is not monotone in W (never for T from ``atq_init``
or ``round_to_grid``) or at AGA on strongly correlated inputs. :func:`canonicalize` flips the sign
of T on those rows, which leaves Q unchanged; ``itf`` and ``ternarize_weight`` apply it, so every
(T, alpha) they return has alpha >= 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch

Tensor = torch.Tensor

# AGA's 2x2 system counts as singular when det / (a*d) = 1 - cos^2(t, 1)_C falls below this
# (t almost proportional to 1 in the C metric): the float64 solve would lose >10 digits.
AGA_REL_TOL = 1e-10


def _float(W: Tensor) -> Tensor:
    return W if W.dtype in (torch.float32, torch.float64) else W.to(torch.float32)


def dequant(T: Tensor, alpha: Tensor, mu: Tensor) -> Tensor:
    """Q = alpha * T + mu, in alpha's dtype (alpha, mu: (n,); T: (n, m))."""
    return alpha.unsqueeze(1) * T.to(alpha.dtype) + mu.unsqueeze(1)


def weight_error(W: Tensor, Q: Tensor) -> float:
    """E_w = ||W - Q||_F^2 (float64 accumulation)."""
    return float((W.double() - Q.double()).square().sum())


def output_error(W: Tensor, Q: Tensor, C: Tensor) -> float:
    """E_x = trace((W - Q) C (W - Q)^T); with C = X^T X this is ||W X^T - Q X^T||_F^2. Computed
    on W's device (a Hessian may be held on the CPU: CaptureCalibration's per-expert ones)."""
    E = W.double() - Q.double().to(W.device)
    return float(((E @ C.to(W.device, torch.float64)) * E).sum())


def canonicalize(T: Tensor, alpha: Tensor) -> Tuple[Tensor, Tensor]:
    """Flip T on rows with alpha < 0 so that alpha >= 0; alpha * T (hence Q) is unchanged."""
    neg = alpha < 0
    return torch.where(neg.unsqueeze(1), -T, T), alpha.abs()


def atq_init(W: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """TWN-style ATQ start: mu = mean_j W_ij, W~ = W - mu, Delta_i = 0.75 mean_j |W~_ij|,
    T_ij = sign(W~_ij) if |W~_ij| > Delta_i else 0, alpha_i = sum_j T_ij W~_ij / sum_j |T_ij|.

    Returns (T int8 (n, m), alpha (n,), mu (n,)). A constant row gets T = 0, alpha = 0, mu = mean.
    """
    W = _float(W)
    W64 = W.double()
    mu = W64.mean(1, keepdim=True)
    Wt = W64 - mu
    delta = 0.75 * Wt.abs().mean(1, keepdim=True)
    T = torch.where(Wt.abs() > delta, torch.sign(Wt), torch.zeros_like(Wt))
    alpha = (T * Wt).sum(1) / T.abs().sum(1).clamp_min(1.0)  # no kept entry: alpha = 0
    return T.to(torch.int8), alpha.to(W.dtype), mu.squeeze(1).to(W.dtype)


def _t_sums(W64: Tensor, T64: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row (sum T, sum T^2, sum W T) in float64; T^2 = |T| for ternary T."""
    return T64.sum(1), T64.abs().sum(1), (W64 * T64).sum(1)


def _grid(m: int, sw: Tensor, s1: Tensor, s2: Tensor, swt: Tensor) -> Tuple[Tensor, Tensor]:
    den = m * s2 - s1 * s1
    ok = den > 0.5  # den is an integer: 0 exactly when the row's T is constant
    den = torch.where(ok, den, torch.ones_like(den))
    alpha = torch.where(ok, (m * swt - s1 * sw) / den, torch.zeros_like(den))
    mu = torch.where(ok, (s2 * sw - s1 * swt) / den, sw / m)
    return alpha, mu


def _sq_err(m, sww, sw, s1, s2, swt, alpha, mu) -> Tensor:
    """Per-row ||w - alpha t - mu 1||^2 expanded in the sums (float64; no n x m pass needed)."""
    return (sww - 2 * alpha * swt - 2 * mu * sw + alpha * alpha * s2 + 2 * alpha * mu * s1
            + m * mu * mu).clamp_min(0)


def fit_grid(W: Tensor, T: Tensor) -> Tuple[Tensor, Tensor]:
    """Optimal (alpha, mu) for fixed T, per row (ITF step 1), the least squares of w ~ alpha t + mu:

        den   = m sum(T^2) - (sum T)^2
        alpha = (m sum(W T) - sum T sum W) / den
        mu    = (sum(T^2) sum W - sum T sum(W T)) / den

    den is an integer, 0 exactly when all T_ij of the row are equal; then Q is a constant row
    whatever (alpha, mu) is and the optimum alpha = 0, mu = mean(W) is returned.
    """
    W = _float(W)
    W64 = W.double()
    alpha, mu = _grid(W.shape[1], W64.sum(1), *_t_sums(W64, T.double()))
    return alpha.to(W.dtype), mu.to(W.dtype)


def _round(W: Tensor, alpha: Tensor, mu: Tensor) -> Tensor:
    a = alpha.to(W.dtype).unsqueeze(1)
    nz = a != 0
    T = torch.round((W - mu.to(W.dtype).unsqueeze(1)) / torch.where(nz, a, torch.ones_like(a)))
    return torch.where(nz, T.clamp(-1, 1), torch.zeros_like(T))


def round_to_grid(W: Tensor, alpha: Tensor, mu: Tensor) -> Tensor:
    """Flexible rounding (ITF step 2): T = clamp(round((W - mu) / alpha), -1, 1), the nearest of
    {mu - alpha, mu, mu + alpha} (for either sign of alpha). Rows with alpha = 0 get T = 0."""
    return _round(_float(W), alpha, mu).to(torch.int8)


@dataclass
class ItfResult:
    T: Tensor
    alpha: Tensor
    mu: Tensor
    iters: int
    history: List[float] = field(default_factory=list)
    """E_w after the init, then after each iteration (monotone non-increasing)."""


def itf(W: Tensor, max_iters: int = 20) -> ItfResult:
    """Iterative Ternary Fitting: from :func:`atq_init`, repeat (fit_grid, round_to_grid) until T
    stops changing or ``max_iters`` iterations ran (then the grid is re-fitted to the last T).

    Both steps are exact minimisations, so E_w cannot rise; to make that hold bit-for-bit despite
    float rounding, a row keeps its previous grid or T if a step would raise its error. The
    errors are evaluated from per-row sums (sum W^2, sum W, sum T, sum |T|, sum W T) in float64
    with (alpha, mu) rounded to W's dtype, as returned. Finally alpha >= 0 (:func:`canonicalize`).
    """
    if max_iters < 1:
        raise ValueError(f"max_iters={max_iters} must be >= 1")
    W = _float(W)
    W64, m, dt = W.double(), W.shape[1], W.dtype
    sww, sw = W64.square().sum(1), W64.sum(1)
    T, alpha, mu = atq_init(W)
    T, alpha, mu = T.double(), alpha.double(), mu.double()
    st = _t_sums(W64, T)
    err = _sq_err(m, sww, sw, *st, alpha, mu)
    history = [float(err.sum())]
    iters, converged = 0, False
    while iters < max_iters:
        iters += 1
        alpha, mu, err = _refit(m, sww, sw, st, alpha, mu, err, dt)
        T_new = _round(W, alpha, mu).double()
        st_new = _t_sums(W64, T_new)
        err_new = _sq_err(m, sww, sw, *st_new, alpha, mu)
        worse = err_new > err
        if bool(worse.any()):  # float noise only: keep those rows' T
            T_new = torch.where(worse.unsqueeze(1), T, T_new)
            st_new = _t_sums(W64, T_new)
        err = torch.minimum(err, err_new)
        history.append(float(err.sum()))
        converged = torch.equal(T_new, T)
        T, st = T_new, st_new
        if converged:
            break
    if not converged:
        alpha, mu, err = _refit(m, sww, sw, st, alpha, mu, err, dt)
        history[-1] = float(err.sum())
    T, alpha = canonicalize(T.to(torch.int8), alpha)
    return ItfResult(T, alpha.to(dt), mu.to(dt), iters, history)


def _refit(m, sww, sw, st, alpha, mu, err, dtype):
    """The optimal grid for the current T (rounded to ``dtype``), kept only where not worse."""
    a_new, m_new = (x.to(dtype).double() for x in _grid(m, sw, *st))
    err_new = _sq_err(m, sww, sw, *st, a_new, m_new)
    take = err_new <= err
    return (torch.where(take, a_new, alpha), torch.where(take, m_new, mu),
            torch.minimum(err, err_new))


def aga(W: Tensor, T: Tensor, C: Tensor) -> Tuple[Tensor, Tensor]:
    """Activation-aware Grid Alignment: per row, the exact minimiser of (w - alpha t - mu 1) C
    (w - alpha t - mu 1)^T for frozen T (METHOD.md §3, not the paper's Eq. 13):

        a = t C t^T, b = t C 1, d = 1^T C 1, p = w C t^T, q = w C 1
        alpha = (d p - b q) / (a d - b^2),   mu = (a q - b p) / (a d - b^2)

    Fallback, per row, when the 2x2 system is singular or ill-conditioned (T = 0, T constant,
    det / (a d) < AGA_REL_TOL, d = 0): the better (in E_x) of the ITF grid ``fit_grid(W, T)`` and
    the mean-only fit alpha = 0, mu = q / d. The 2x2 solution itself is also only taken where its
    E_x does not exceed the ITF grid's, so AGA never raises E_x. alpha may be < 0 (see the module
    docstring): use :func:`canonicalize`. C must be symmetric positive semi-definite (m, m).
    """
    W = _float(W)
    W64, T64, C64 = W.double(), T.double(), C.double()
    TC, WC = T64 @ C64, W64 @ C64
    a, b, p = (TC * T64).sum(1), TC.sum(1), (WC * T64).sum(1)
    q, wcw = WC.sum(1), (WC * W64).sum(1)
    d = C64.sum()

    def ex(al, m_):  # E_x of the row for grid (al, m_), the quadratic form expanded
        return wcw - 2 * al * p - 2 * m_ * q + al * al * a + 2 * al * m_ * b + m_ * m_ * d

    det = a * d - b * b
    ok = (a > 0) & (d > 0) & (det > AGA_REL_TOL * a * d)
    safe = torch.where(ok, det, torch.ones_like(det))
    alpha = torch.where(ok, (d * p - b * q) / safe, torch.zeros_like(det))
    mu = torch.where(ok, (a * q - b * p) / safe, torch.zeros_like(det))
    a_itf, m_itf = (x.double() for x in fit_grid(W, T))
    best_a, best_m, best_e = a_itf, m_itf, ex(a_itf, m_itf)
    if bool(d > 0):
        m_mean = q / d
        better = ex(torch.zeros_like(m_mean), m_mean) < best_e
        best_a = torch.where(better, torch.zeros_like(best_a), best_a)
        best_m = torch.where(better, m_mean, best_m)
        best_e = torch.minimum(best_e, ex(best_a, best_m))
    use = ok & torch.isfinite(alpha) & torch.isfinite(mu) & (ex(alpha, mu) <= best_e)
    alpha = torch.where(use, alpha, best_a)
    mu = torch.where(use, mu, best_m)
    return alpha.to(W.dtype), mu.to(W.dtype)
