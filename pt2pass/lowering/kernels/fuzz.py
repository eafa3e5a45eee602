"""Random cases for ``ternary_linear_triton`` against a float64 reference.

Shared by ``tests/lowering/test_fuzz.py`` (a few small cases in the Triton interpreter on CPU
tensors) and ``benchmarks/fuzz_kernels.py`` (hundreds of cases, up to N = 16384, K = 8192 and
M = 4096, on CUDA). A case draws M from one of the dispatcher's paths (GEMV at M = 1, the half2
GEMV at M = 2, GEMM with the gather in the kernel up to 16 rows, split-K GEMM up to 64, GEMM,
dequantize + matmul from 256), any N, K a
multiple of 16 (mostly of 128, the kernels' block; otherwise the reference fallback runs, also
checked), x float32/bf16/fp16, 2-D or 3-D, contiguous, row-padded or transposed, with or without
bias and SSR permutation, scales in float16 (what the pipeline stores), bfloat16 or float32.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..format import dequantize, pack_ternary
from ..reference import ternary_linear_reference
from .dispatch import DEQUANT_MIN_M, GATHER_MAX_M, GEMV_MAX_M, IMMA_ANY_SIZE_M, IMMA_MAX_M, ternary_linear_triton
from .gemm import SMALL_M_MAX

# Relative Frobenius error allowed per activation dtype: float32 carries the kernels' own error
# (the GEMV's x' cancellation, ~1e-5); bf16 / fp16 add the rounding of the output and, in the
# GEMM, of the folded weight (2^-9 / 2^-11 per element). "Relative" is to the larger of |y| and
# the root-sum-square of the products x_k * W_nk (see :func:`error_scale`).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
DTYPES = tuple(TOLERANCE)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("contiguous", "row_padded", "transposed")


@dataclass(frozen=True)
class Limits:
    """Largest sizes a profile draws (M of the largest path bucket, N, K)."""

    max_m: int
    max_n: int
    max_k: int


SMALL = Limits(max_m=520, max_n=96, max_k=512)       # the interpreter: seconds per case
LARGE = Limits(max_m=4096, max_n=16384, max_k=8192)  # CUDA (N >= 8192: the prepacked GEMV)


@dataclass(frozen=True)
class FuzzCase:
    lead: Tuple[int, ...]   # leading dims of x; M = their product
    n: int
    k: int
    dtype: torch.dtype
    scale_dtype: torch.dtype
    block_size: int
    bias: bool
    perm: bool
    layout: str
    seed: int

    @property
    def m(self) -> int:
        return math.prod(self.lead)

    def describe(self) -> str:
        name = lambda d: str(d).replace("torch.", "")
        return (f"x{list(self.lead) + [self.k]} N={self.n} {name(self.dtype)} "
                f"scales={name(self.scale_dtype)} block={self.block_size} "
                f"bias={int(self.bias)} perm={int(self.perm)} {self.layout} seed={self.seed}")


def _m_buckets(limit: int) -> List[Tuple[int, int]]:
    """One M range per dispatcher path, cut at ``limit``."""
    lo, hi = IMMA_ANY_SIZE_M
    edges = [(1, GEMV_MAX_M), (GEMV_MAX_M + 1, lo - 1), (lo, hi), (hi + 1, max(IMMA_MAX_M, GATHER_MAX_M)),
             (max(IMMA_MAX_M, GATHER_MAX_M) + 1, SMALL_M_MAX),
             (SMALL_M_MAX + 1, DEQUANT_MIN_M - 1), (DEQUANT_MIN_M, limit)]
    return [(lo, min(hi, limit)) for lo, hi in edges if lo <= limit]


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def draw_cases(count: int, seed: int, limits: Limits = SMALL) -> List[FuzzCase]:
    """``count`` cases, a deterministic function of ``seed``; the M buckets are cycled so every
    dispatcher path gets its share."""
    rng = random.Random(seed)
    buckets = _m_buckets(limits.max_m)
    cases = []
    for i in range(count):
        lo, hi = buckets[i % len(buckets)]
        m = _log_uniform(rng, lo, hi)
        lead = (m,)
        if m > 1 and rng.random() < 0.4:  # 3-D x: (batch, seq, K)
            b = rng.choice([d for d in range(1, min(m, 8) + 1) if m % d == 0])
            lead = (b, m // b)
        if rng.random() < 0.75:  # the kernels' case: whole 128-column blocks
            k = 128 * _log_uniform(rng, 1, max(1, limits.max_k // 128))
        else:  # a partial last block (e.g. SmolLM2's 576): the reference fallback
            k = 16 * _log_uniform(rng, 1, limits.max_k // 16)
        cases.append(FuzzCase(
            lead=lead, n=_log_uniform(rng, 1, limits.max_n), k=k, dtype=rng.choice(DTYPES),
            scale_dtype=rng.choice(SCALE_DTYPES), block_size=128 if rng.random() < 0.9 else 64,
            bias=rng.random() < 0.5, perm=rng.random() < 0.5, layout=rng.choice(LAYOUTS),
            seed=rng.randrange(2**31)))
    return cases


def _layer(case: FuzzCase, device) -> tuple:
    g = torch.Generator(device=device).manual_seed(case.seed)
    n, k, blocks = case.n, case.k, -(-case.k // case.block_size)
    T = torch.randint(-1, 2, (n, k), generator=g, device=device)
    alpha = ((torch.rand(n, blocks, generator=g, device=device) + 0.5) * 0.1).to(case.scale_dtype)
    mu = (torch.randn(n, blocks, generator=g, device=device) * 0.02).to(case.scale_dtype)
    bias = torch.randn(n, generator=g, device=device).to(case.dtype) if case.bias else None
    perm = torch.randperm(k, generator=g, device=device) if case.perm else None
    return pack_ternary(T), alpha, mu, bias, perm


def _activations(case: FuzzCase, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(case.seed + 1)
    shape = (*case.lead, case.k)
    if case.layout == "row_padded":  # unit stride along K, rows 32 columns apart further
        full = torch.randn(*case.lead, case.k + 32, generator=g, device=device)
        return full.to(case.dtype)[..., : case.k]
    if case.layout == "transposed":  # stride along K is M: the dispatcher must copy
        return torch.randn(*reversed(shape), generator=g, device=device).to(case.dtype).permute(
            *reversed(range(len(shape))))
    return torch.randn(*shape, generator=g, device=device).to(case.dtype)


def error_scale(x: torch.Tensor, packed, alpha, mu, perm, block_size: int, ref: torch.Tensor) -> float:
    """max(|y|, |rss|) (Frobenius norms), rss_n = sqrt(sum_k (x_k W_nk)^2): the size of the terms
    that the kernels round. |y| alone is no scale when the products cancel: a single output
    (N = 1) that sums to a tenth of its terms made a correct fp16 result look 10x too wrong."""
    if perm is not None:
        x = x.index_select(-1, perm)
    w = dequantize(packed, alpha.double(), mu.double(), block_size, torch.float64)
    rss = (x.double().square() @ w.square().T).sqrt()
    return max(float(ref.norm()), float(rss.norm()), 1e-30)


def run_case(case: FuzzCase, device="cpu") -> Tuple[float, Optional[str]]:
    """(relative error vs float64, None or what is wrong) for one case on ``device``."""
    packed, alpha, mu, bias, perm = _layer(case, device)
    x = _activations(case, device)
    out = ternary_linear_triton(x, packed, alpha, mu, bias, perm, case.block_size)
    ref = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double(),
                                   None if bias is None else bias.double(), perm, case.block_size)
    if out.shape != ref.shape or out.dtype != x.dtype:
        return float("nan"), f"output {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {x.dtype}"
    if not bool(torch.isfinite(out).all()):
        return float("nan"), "non-finite output"
    scale = error_scale(x, packed, alpha, mu, perm, case.block_size, ref)
    err = float((out.double() - ref).norm()) / scale
    if err > TOLERANCE[case.dtype]:
        return err, f"relative error {err:.2e} > {TOLERANCE[case.dtype]:.2g}"
    return err, None
