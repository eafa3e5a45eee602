"""Experimental kernel (not used by the dispatcher yet): the int16-x dp2a GEMV for BM rows of x
per program, each word's codes extracted once (:data:`DECODE_ASM`: 3 shifts + 4 ANDs) and
multiplied with every row (:data:`DOT_ASM`: 8 dp2a per row). Per word and row that is 8 dp2a + one
convert and one FMA, against 8 HFMA2 + 4 for the half2 rows kernel (gemv_packed.py) that runs
M = 2 now. Written in session 7 without a GPU left to time it: ``sweep_gemv_rows.py`` times it
against the half2 rows kernel and the tensor-core GEMM at M = 2, 4, 8.

x is quantized by gemv_dp2a.quantize_x (one launch for all rows); the arithmetic, layout and
epilogue are dp2a.py's (see its module doc).
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from pt2pass.lowering.kernels.common import (INTERPRET, launch, launch_args, load_pairs,  # noqa: E402
                                             load_weight_tile, splitk_reduce, store_gemv_rows)
from pt2pass.lowering.kernels.gemv_dp2a import quantize_x  # noqa: E402

# $0..$3 = (w >> 2r) & 0x03030303 of word $4: the codes of slots r, 4 + r, 8 + r, 12 + r in bytes 0..3
DECODE_ASM = tl.constexpr(" ".join(
    ["{", ".reg .b32 t;", "and.b32 $0, $4, 0x03030303;"]
    + [f"shr.u32 t, $4, {2 * r}; and.b32 ${r}, t, 0x03030303;" for r in (1, 2, 3)] + ["}"]))
# $0 (s32) = the word's sum of q * x_int from the code bytes $1..$4 (r = 0..3) and pairs $5..$12 (p = 2r + h)
DOT_ASM = tl.constexpr(" ".join(
    ["{"] + [f"dp2a.{'lo' if p % 2 == 0 else 'hi'}.s32.u32 $0, ${5 + p}, ${1 + p // 2}, {'0' if p == 0 else '$0'};"
             for p in range(8)] + ["}"]))


@triton.jit
def _emulated_dot(b0, b1, b2, b3, p0, p1, p2, p3, p4, p5, p6, p7):
    acc = _pair(b0, p0, 0) + _pair(b0, p1, 16) + _pair(b1, p2, 0) + _pair(b1, p3, 16)
    return acc + _pair(b2, p4, 0) + _pair(b2, p5, 16) + _pair(b3, p6, 0) + _pair(b3, p7, 16)


@triton.jit
def _pair(b, pair, shift: tl.constexpr):
    """dp2a.lo (shift 0) / .hi (shift 16): two code bytes of b times the int16 pair."""
    return ((b >> shift) & 0xFF) * ((pair << 16) >> 16) + ((b >> (shift + 8)) & 0xFF) * (pair >> 16)


@triton.jit
def ternary_gemv_dp2a_rows_kernel(xp_ptr, xscale_ptr, xint_ptr, xs_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, out_ptr,
                                  M, N, KW, NB, blocks_per_split,
                                  HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr, USE_ASM: tl.constexpr,
                                  BM: tl.constexpr, BN: tl.constexpr, NBT: tl.constexpr):
    """BM rows of x against BN rows of W, each word's codes extracted once."""
    pid_k = tl.program_id(1)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_ok = rows < N
    ms = tl.program_id(2) * BM + tl.arange(0, BM)
    m_ok = ms < M
    msafe = tl.where(m_ok, ms, 0).to(tl.int64)  # rows past M read row 0, masked at the store
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)
    xp_rows = xp_ptr + msafe[:, None, None] * 8 * KW
    w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * KW
    acc_w = tl.zeros((BM, BN, NBT, 8), tl.float32)
    acc_b = tl.zeros((BM, BN, NBT), tl.float32)
    for b0 in range(b_lo, b_hi, NBT):
        blk = b0 + tl.arange(0, NBT)
        blk_ok = blk < b_hi
        words, al, mu = load_weight_tile(w_rows, a_ptr, mu_ptr, rows, row_ok, blk, blk_ok, NB)
        col = (blk[:, None] * 8 + tl.arange(0, 8)[None, :])[None, :, :]
        cok = blk_ok[None, :, None] & (col >= 0)
        p0, p1, p2, p3, p4, p5, p6, p7 = load_pairs(xp_rows, col, cok, KW)
        sofs = msafe[:, None] * NB + blk[None, :]
        scale = tl.load(xscale_ptr + sofs, mask=blk_ok[None, :], other=0.0)
        xint = tl.load(xint_ptr + sofs, mask=blk_ok[None, :], other=0).to(tl.float32)
        xs = tl.load(xs_ptr + sofs, mask=blk_ok[None, :], other=0.0)
        if USE_ASM:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(DECODE_ASM, "=r,=r,=r,=r,r", [words],
                                                       dtype=(tl.int32,) * 4, is_pure=True, pack=1)
            part = tl.inline_asm_elementwise(
                DOT_ASM, "=r,r,r,r,r,r,r,r,r,r,r,r,r",
                [c0[None], c1[None], c2[None], c3[None], p0[:, None], p1[:, None], p2[:, None], p3[:, None],
                 p4[:, None], p5[:, None], p6[:, None], p7[:, None]], dtype=tl.int32, is_pure=True, pack=1)
        else:
            c0 = words & 0x03030303
            c1 = (words >> 2) & 0x03030303
            c2 = (words >> 4) & 0x03030303
            c3 = (words >> 6) & 0x03030303
            part = _emulated_dot(c0[None], c1[None], c2[None], c3[None], p0[:, None], p1[:, None], p2[:, None],
                                 p3[:, None], p4[:, None], p5[:, None], p6[:, None], p7[:, None])
        a_s = al[None, :, :] * scale[:, None, :]
        acc_w += part.to(tl.float32) * a_s[:, :, :, None]
        acc_b += mu[None, :, :] * xs[:, None, :] - a_s * xint[:, None, :]
    y = tl.sum(tl.sum(acc_w, axis=3) + acc_b, axis=2)  # (BM, BN)
    store_gemv_rows(out_ptr, bias_ptr, y, ms, m_ok, rows, row_ok, pid_k, M, N, HAS_BIAS, SPLIT_OUT)


def ternary_gemv_dp2a_rows(x: torch.Tensor, packed, alpha, mu, bias, perm, out: torch.Tensor, split: int,
                           bm: int, config: dict) -> torch.Tensor:
    """y = x[:, perm] @ W^T + bias into ``out`` (M, N) with BM rows of x per program; ``config``
    {"BN", "NBT", "num_warps"}."""
    args, split, target = launch_args("ternary_gemv_dp2a_rows", x, packed, alpha, mu, bias, perm, out, split)
    _, _, _, _, bias_arg, _, target, m, n, kw, nb, _, bps, _, _ = args
    grid = (triton.cdiv(n, config["BN"]), split, triton.cdiv(m, bm))
    launch(ternary_gemv_dp2a_rows_kernel, grid, *quantize_x(x, perm), packed, alpha, mu, bias_arg, target,
           m, n, kw, nb, bps, HAS_BIAS=bias is not None, SPLIT_OUT=split > 1, USE_ASM=not INTERPRET, BM=bm,
           num_stages=1, **config)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out
