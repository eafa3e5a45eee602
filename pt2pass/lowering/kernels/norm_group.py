"""Residual add + RMSNorm inside the grouped GEMV's x quantization (decode graphs, M = 1).

A LLaMA-style decoder layer computes h = residual + delta, then x = w * rms_norm(h), then q/k/v (or
gate/up) of x. Unfused, Inductor runs the add and the norm as one kernel per norm (64 launches per
7B step, ~140 us of its ~2260 on the H200, session 13's profile), then the grouped GEMV quantizes x
in a launch of its own (gemv_group.py). Here that quantize launch does all of it: it reads the two
summands, writes h (the residual stream goes on from it), quantizes u = w * h per 128-column block
and stores each block's sum of h^2; the GEMV then multiplies its output rows by
rstd = 1 / sqrt(mean(h^2) + eps). That is exact algebra, not an approximation: every term of the
dp2a GEMV's y is linear in x's block scales and block sums, so the row's factor comes out of the
sum, and the quantization of u per block is that of rstd * u.

Numerics: transformers rounds h * rstd to the activation dtype, then multiplies by w (rounding
again); here u is exact in float32 and rstd is applied in float32 at the end. The fused result
differs from the unfused graph's by those two roundings (<= 2^-8 relative per element of x, the
precision of bf16 x itself).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .common import PREPACK, launch
from .dp2a import quantize_slots, store_quantized
from .gemv_dp2a import quantize_buffers
from .gemv_group import padded_members, pick_member, check_group_args, launch_group


@triton.jit
def _sum_rounded(a, b):
    """a + b (bf16 / fp16) as torch adds them: in float32, rounded to the nearest even. For bf16 the
    rounding is done on the bits (exact on the GPU too), because the interpreter's float32 -> bf16
    conversion truncates."""
    s = a.to(tl.float32) + b.to(tl.float32)
    if a.dtype == tl.bfloat16:
        bits = s.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000: bf16's 16 bits
        s = tl.where(s == s, bits.to(tl.float32, bitcast=True), s)  # NaN stays NaN
    return s.to(a.dtype)


@triton.jit
def _norm_slot(a_row, b_row, w_ptr, h_row, perm_ptr, blk, ok, h_ok, s: tl.constexpr, HAS_PERM: tl.constexpr):
    """At slot s of every word column (columns 128 b + 8 s + j, gathered through ``perm_ptr``):
    h = a + b rounded to a's dtype (stored to ``h_row`` where ``h_ok``), and in float32 w * h and h^2."""
    ks = blk[:, None] * 128 + 8 * s + tl.arange(0, 8)[None, :]
    if HAS_PERM:
        ks = tl.load(perm_ptr + ks, mask=ok, other=0)
    a = tl.load(a_row + ks, mask=ok, other=0.0)
    b = tl.load(b_row + ks, mask=ok, other=0.0)
    h = _sum_rounded(a, b)
    tl.store(h_row + ks, h, mask=h_ok)
    hf = h.to(tl.float32)
    return hf * tl.load(w_ptr + ks, mask=ok, other=0.0).to(tl.float32), hf * hf


@triton.jit
def _add_norm_quantize_kernel(a_ptr, b_ptr, w_ptr, h_ptr, perm0, perm1, perm2, xp_ptr, xscale_ptr, xint_ptr,
                              xs_ptr, ss_ptr, KW, NB, HAS_PERM: tl.constexpr, NBT: tl.constexpr):
    """For this program's NBT blocks, gathered through member g's permutation (g = program_id(1)):
    u = w * (a + b) quantized as gemv_dp2a's x into row g of the buffers, the blocks' sums of h^2
    into row g of ``ss_ptr``; the programs of member 0 also store h (all of it: every member's
    permutation, when there are, is one of 0..K-1, as ternary_linear's perm must be)."""
    g = tl.program_id(1).to(tl.int64)
    perm = pick_member(g, perm0, perm1, perm2)
    blk = tl.program_id(0) * NBT + tl.arange(0, NBT)
    ok = (blk < NB)[:, None] & (tl.arange(0, 8) < 8)[None, :]
    h_ok = ok & (g == 0)
    u0, q0 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 0, HAS_PERM)
    u1, q1 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 1, HAS_PERM)
    u2, q2 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 2, HAS_PERM)
    u3, q3 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 3, HAS_PERM)
    u4, q4 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 4, HAS_PERM)
    u5, q5 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 5, HAS_PERM)
    u6, q6 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 6, HAS_PERM)
    u7, q7 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 7, HAS_PERM)
    u8, q8 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 8, HAS_PERM)
    u9, q9 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 9, HAS_PERM)
    u10, q10 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 10, HAS_PERM)
    u11, q11 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 11, HAS_PERM)
    u12, q12 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 12, HAS_PERM)
    u13, q13 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 13, HAS_PERM)
    u14, q14 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 14, HAS_PERM)
    u15, q15 = _norm_slot(a_ptr, b_ptr, w_ptr, h_ptr, perm, blk, ok, h_ok, 15, HAS_PERM)
    p0, p1, p2, p3, p4, p5, p6, p7, scale, xint, xsum = quantize_slots(u0, u1, u2, u3, u4, u5, u6, u7, u8, u9,
                                                                       u10, u11, u12, u13, u14, u15)
    store_quantized(xp_ptr + g * 8 * KW, xscale_ptr + g * NB, xint_ptr + g * NB, xs_ptr + g * NB, blk, ok, KW, NB,
                    p0, p1, p2, p3, p4, p5, p6, p7, scale, xint, xsum)
    squares = ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7)) + ((q8 + q9) + (q10 + q11)) + ((q12 + q13) + (q14 + q15))
    tl.store(ss_ptr + g * NB + blk, tl.sum(squares, axis=1), mask=blk < NB)


def ternary_gemv_group_add_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float,
                                packed: List[torch.Tensor], alpha: List[torch.Tensor], mu: List[torch.Tensor],
                                bias: List[Optional[torch.Tensor]], perm: List[Optional[torch.Tensor]],
                                config=None, tma=None) -> List[torch.Tensor]:
    """[h, *ternary_gemv_group(x, ...)] with h = a + b and x = weight * rms_norm(h) (module doc),
    for single rows a, b (1, K) and weight (K,) of one bf16/fp16 dtype, unit strides; two launches."""
    check_group_args(a, packed, alpha, mu, bias, perm)
    k = a.shape[1]
    if b.shape != a.shape or b.dtype != a.dtype or b.stride(1) != 1 or weight.shape != (k,) \
            or weight.dtype != a.dtype or weight.stride(0) != 1:
        raise ValueError(f"ternary_gemv_group_add_norm needs b like a {tuple(a.shape)} {a.dtype} and a weight "
                         f"({k},) of that dtype, unit strides; got b {tuple(b.shape)} {b.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}")
    has_perm = perm[0] is not None
    rows = len(perm) if has_perm else 1
    h = torch.empty_like(a)
    xq = quantize_buffers(rows, k, a.device)
    ss = torch.empty((rows, k // 128), device=a.device, dtype=torch.float32)
    p = padded_members(list(perm)) if has_perm else [ss] * 3  # unread without HAS_PERM
    launch(_add_norm_quantize_kernel, (triton.cdiv(k // 128, PREPACK["NBT"]), rows), a, b, weight, h, *p, *xq, ss,
           k // 16, k // 128, HAS_PERM=has_perm, **PREPACK)
    return [h, *launch_group(xq, a, packed, alpha, mu, bias, has_perm, config, tma, norm=(ss, float(eps)))]
