"""Running second moment of a Linear layer's inputs, H = (2/N) sum_t x_t x_t^T (the GPTQ Hessian
of ||W X^T - Q X^T||^2 / N up to the constant)."""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

import torch

Tensor = torch.Tensor
log = logging.getLogger(__name__)


class HessianAccumulator:
    """Accumulate H = (2/N) sum x x^T over batches of activations x of shape (..., m).

    The update is GPTQ's running mean: H <- H * N / (N + t); N <- N + t; H += (sqrt(2/N) x)^T
    (sqrt(2/N) x). H then stays O(|x|^2) whatever N is, instead of growing with N (a plain sum in
    float32 would lose the late batches' contribution once it is large).
    """

    def __init__(self, m: int, device: Optional[Union[str, torch.device]] = None,
                 dtype: torch.dtype = torch.float32):
        if not isinstance(m, int) or m <= 0:
            raise ValueError(f"m={m!r} must be a positive integer (the layer's in_features)")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype} is not supported; use torch.float32 or torch.float64")
        self.m = m
        self.H = torch.zeros(m, m, device=device, dtype=dtype)
        self.n_tokens = 0

    def add(self, x: Tensor) -> None:
        """Add the tokens of ``x`` (..., m); all leading dimensions are flattened into tokens."""
        if x.dim() == 0 or x.shape[-1] != self.m:
            raise ValueError(f"activations of shape {tuple(x.shape)} do not end in the layer's "
                             f"in_features={self.m}")
        x = x.detach().reshape(-1, self.m).to(device=self.H.device, dtype=self.H.dtype)
        t = x.shape[0]
        if t == 0:
            return
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"activations contain {bad} NaN/Inf value(s) among {x.numel()} "
                             f"(shape {tuple(x.shape)}); the calibration forward pass diverged")
        self.H.mul_(self.n_tokens / (self.n_tokens + t))
        self.n_tokens += t
        x = x * math.sqrt(2.0 / self.n_tokens)
        self.H.addmm_(x.t(), x)

    def hessian(self) -> Tensor:
        """A copy of H (m, m). Raises if no token was ever added (H would be meaningless)."""
        if self.n_tokens == 0:
            raise ValueError("no activations were added to this HessianAccumulator "
                             "(the layer never ran on calibration data)")
        return self.H.clone()


def prepare_hessian(W: Tensor, H: Tensor, damp: float, dtype: torch.dtype = torch.float64,
                    dead_diagonal: Optional[float] = None):
    """GPTQ's preparation of (W, H), on W's device in ``dtype``; returns (W, H, n_dead).

    Dead columns (diag H == 0: the input is always 0) get W[:, j] = 0 and, so that H is
    invertible, H[j, j] = the mean of the live diagonal; then H += damp * mean(diag H) * I
    (Tikhonov damping). GPTQ's reference sets H[j, j] = 1, which is not invariant to the scale of
    H: on small activations (mean diag H ~ 1e-3) the 1s dominated the damping; the GPTQ baseline
    passes ``dead_diagonal=1.0`` to match it. A metric that must give dead columns no weight
    (AGA's C) masks them with :func:`mask_dead`.
    """
    m = W.shape[1]
    if H.shape != (m, m):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({m}, {m}) for in_features={m}")
    H = H.to(device=W.device, dtype=dtype).clone()
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H contains NaN/Inf; the calibration activations were not finite")
    W = W.to(dtype).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    n_dead = int(dead.sum())
    if dead_diagonal is not None:
        diag[dead] = dead_diagonal
    elif n_dead:
        diag[dead] = diag[~dead].mean() if n_dead < m else 1.0
    W[:, dead] = 0.0
    diag += damp * diag.mean()
    return W, H, n_dead


def mask_dead(C: Tensor, live: Optional[Tensor]) -> Tensor:
    """C with the rows and columns of dead inputs (``live`` False) zeroed: their x is always 0, so
    ||(W - Q) X||^2 gives their columns no weight (prepare_hessian's stand-in diagonal would)."""
    if live is None:
        return C
    w = live.to(C.dtype)
    return C * w[:, None] * w[None, :]


def cholesky_inverse_damped(H: Tensor, max_tries: int = 7) -> Tensor:
    """H^{-1} via Cholesky; if H is not numerically positive definite, add 10x more damping
    (starting at 1e-6 mean(diag H)) and retry, logging a warning each time."""
    scale = float(torch.diagonal(H).mean().abs()) or 1.0
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    extra = 0.0
    for attempt in range(max_tries + 1):
        L, info = torch.linalg.cholesky_ex(H + extra * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(L)
        extra = scale * 10.0 ** (attempt - 6)
        log.warning("H is not positive definite (Cholesky failed at column %d); retrying with "
                    "extra damping %.3g", int(info), extra)
    raise ValueError("H stays singular after damping; check the calibration activations")


class GroupedHessians:
    """Per-group Hessians of rows sorted by group (MoE experts), computed one group at a time
    (``hessians[g]``): in batch i, rows ``offs[i][g-1]:offs[i][g]`` of ``xs[i]`` (S, m) belong to
    group g (``offs``: cumulative row counts per group; rows past ``offs[i][-1]`` belong to none).
    One at a time because all of them at once can be large (Mixtral's down projection: 8 x 14336^2
    floats, 6.6 GB). A group that got no row gets the Hessian of all rows (``counts[g] == 0``): its
    weights see the same inputs once routed to, and without any H the compensation would have
    nothing to weigh."""

    def __init__(self, xs: Sequence[Tensor], offs: Sequence[Tensor], n_groups: int,
                 device: Optional[Union[str, torch.device]] = None):
        if not xs or len(xs) != len(offs):
            raise ValueError(f"grouped Hessians need one offs tensor per activation batch, got "
                             f"{len(xs)} batches and {len(offs)} offs")
        self.xs, self.m, self.device = list(xs), xs[0].shape[-1], device or xs[0].device
        self.bounds = []  # per batch: [(start, end) of each group]
        for x, off in zip(xs, offs):
            ends = [int(e) for e in off.tolist()]
            if len(ends) != n_groups or any(b < a for a, b in zip([0] + ends, ends)) or ends[-1] > x.shape[0]:
                raise ValueError(f"offs {ends} are not {n_groups} non-decreasing row counts within the "
                                 f"batch's {x.shape[0]} rows")
            self.bounds.append(list(zip([0] + ends[:-1], ends)))
        self.counts = [sum(b[g][1] - b[g][0] for b in self.bounds) for g in range(n_groups)]
        self._pooled: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, g: int) -> Tensor:
        if not 0 <= g < len(self):
            raise IndexError(f"group {g} of {len(self)}")
        if self.counts[g] == 0:
            if self._pooled is None:
                self._pooled = self._hessian([(b[0][0], b[-1][1]) for b in self.bounds])
            return self._pooled
        return self._hessian([b[g] for b in self.bounds])

    def _hessian(self, ranges) -> Tensor:
        acc = HessianAccumulator(self.m, device=self.device)
        for x, (start, end) in zip(self.xs, ranges):
            acc.add(x[start:end])
        return acc.hessian()
