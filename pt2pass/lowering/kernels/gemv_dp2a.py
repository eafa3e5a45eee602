"""GEMV for one row of bf16/fp16 x with int16 x and dp2a arithmetic (dp2a.py), x quantized once per call.

Same structure as gemv_packed.py (a small prepack kernel, then BN rows of W per program, NBT
blocks per iteration, split-K for small N), with dp2a.py's integer word dots: 15 instead of ~27
instructions per word in the PTX (28 against 42 SASS instructions per word in the whole loop),
then per word one int -> float convert and one multiply-add by alpha * s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, PREPACK, autotune, gemv_configs, launch, launch_args, launch_tuned, load_pairs,
                     load_weight_tile, splitk_reduce, store_gemv_row)
from .dp2a import quantize_row, word_dots


@triton.jit
def _quantize_x_kernel(x_ptr, perm_ptr, xp_ptr, xscale_ptr, xint_ptr, xs_ptr, KW, NB, stride_xm,
                       HAS_PERM: tl.constexpr, NBT: tl.constexpr):
    """:func:`quantize_row` for x row m = program_id(1): xp (M, 8, KW) int32, the rest (M, NB)."""
    m = tl.program_id(1).to(tl.int64)
    quantize_row(x_ptr + m * stride_xm, perm_ptr, xp_ptr + m * 8 * KW, xscale_ptr + m * NB,
                 xint_ptr + m * NB, xs_ptr + m * NB, KW, NB, HAS_PERM, NBT)


def quantize_buffers(rows: int, k: int, device) -> tuple:
    """Empty (xp int32 (rows, 8, K/16), scale float32, X int32, sum float32 (rows, K/128))."""
    nb = k // 128
    return (torch.empty((rows, 8, k // 16), device=device, dtype=torch.int32),
            torch.empty((rows, nb), device=device, dtype=torch.float32),
            torch.empty((rows, nb), device=device, dtype=torch.int32),
            torch.empty((rows, nb), device=device, dtype=torch.float32))


def quantize_x(x: torch.Tensor, perm) -> tuple:
    """(xp int32 (M, 8, K/16), scale float32, X int32, sum float32 (M, K/128)) of x[:, perm]."""
    m, k = x.shape
    kw, nb = k // 16, k // 128
    xp, xscale, xint, xs = quantize_buffers(m, k, x.device)
    launch(_quantize_x_kernel, (triton.cdiv(nb, PREPACK["NBT"]), m), x, perm if perm is not None else xp,
           xp, xscale, xint, xs, kw, nb, x.stride(0), HAS_PERM=perm is not None, **PREPACK)
    return xp, xscale, xint, xs


@triton.jit
def gemv_tile_dp2a(xp_row, xscale_row, xint_row, xs_row, w_ptr, a_ptr, mu_ptr, rows, row_ok, b_lo, b_hi,
                   KW, NB, USE_ASM: tl.constexpr, BN: tl.constexpr, NBT: tl.constexpr):
    """y (BN,) float32 = the K blocks [b_lo, b_hi) of W's ``rows`` times one quantized x row."""
    w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * KW
    acc_w = tl.zeros((BN, NBT, 8), tl.float32)  # per word: alpha * s * P
    acc_b = tl.zeros((BN, NBT), tl.float32)     # per block: mu * sum(x) - alpha * s * X
    for b0 in range(b_lo, b_hi, NBT):
        blk = b0 + tl.arange(0, NBT)
        blk_ok = blk < b_hi
        words, al, mu = load_weight_tile(w_rows, a_ptr, mu_ptr, rows, row_ok, blk, blk_ok, NB)
        col = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
        cok = blk_ok[:, None] & (col >= 0)
        p0, p1, p2, p3, p4, p5, p6, p7 = load_pairs(xp_row, col, cok, KW)
        scale = tl.load(xscale_row + blk, mask=blk_ok, other=0.0)
        xint = tl.load(xint_row + blk, mask=blk_ok, other=0).to(tl.float32)
        xs = tl.load(xs_row + blk, mask=blk_ok, other=0.0)
        a_s = al * scale[None, :]
        # Per word, not summed over the block's 8 words first: that sum crosses threads (shuffles
        # every iteration; 454 against 579 SASS instructions per iteration, offline sm_90 build).
        acc_w += word_dots(words, p0, p1, p2, p3, p4, p5, p6, p7, USE_ASM).to(tl.float32) * a_s[:, :, None]
        acc_b += mu * xs[None, :] - a_s * xint[None, :]
    return tl.sum(tl.sum(acc_w, axis=2) + acc_b, axis=1)


# (rows per program, blocks per iteration, warps): each the best on some shape of the H200 sweep
# (session 7, sweep_gemv_half2.py); (8, 32, 4) never was.
DP2A_SHAPES = [(8, 16, 2), (8, 8, 1), (16, 16, 4), (16, 8, 2), (16, 32, 4)]


@autotune(gemv_configs(DP2A_SHAPES), key=["m_bucket", "N", "KW", "blocks_per_split"])
@triton.jit
def ternary_gemv_dp2a_kernel(xp_ptr, xscale_ptr, xint_ptr, xs_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, out_ptr,
                             M, N, KW, NB, blocks_per_split, m_bucket,
                             HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr,
                             USE_ASM: tl.constexpr, BN: tl.constexpr, NBT: tl.constexpr):
    """One row of x (program_id 2) against BN rows of W."""
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_ok = rows < N
    b_lo = pid_k * blocks_per_split
    m64 = m.to(tl.int64)
    y = gemv_tile_dp2a(xp_ptr + m64 * 8 * KW, xscale_ptr + m64 * NB, xint_ptr + m64 * NB, xs_ptr + m64 * NB,
                       w_ptr, a_ptr, mu_ptr, rows, row_ok, b_lo, tl.minimum(b_lo + blocks_per_split, NB),
                       KW, NB, USE_ASM, BN, NBT)
    store_gemv_row(out_ptr, bias_ptr, y, rows, row_ok, m, pid_k, M, N, HAS_BIAS, SPLIT_OUT)


FIXED = {"BN": 16, "NBT": 2} if INTERPRET else {"BN": 8, "NBT": 16, "num_warps": 2}


def ternary_gemv_dp2a(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                      bias, perm, out: torch.Tensor, split: int = 1, config=None) -> torch.Tensor:
    """y = x[:, perm] @ W^T + bias into ``out`` (M, N), x bf16/fp16 (M, K), one program row per x row.
    ``config``: a fixed {"BN", "NBT", "num_warps"} (experiments), else autotuned / the default."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"ternary_gemv_dp2a takes bf16/fp16 activations, got {x.dtype}")
    args, split, target = launch_args("ternary_gemv_dp2a", x, packed, alpha, mu, bias, perm, out, split)
    _, _, _, _, bias_arg, _, target, m, n, kw, nb, _, bps, _, bucket = args
    xq = quantize_x(x, perm)
    args = (*xq, packed, alpha, mu, bias_arg, target, m, n, kw, nb, bps, bucket)
    meta = dict(HAS_BIAS=bias is not None, SPLIT_OUT=split > 1, USE_ASM=not INTERPRET)
    launch_tuned(ternary_gemv_dp2a_kernel, lambda bn: (triton.cdiv(n, bn), split, m), FIXED, config, *args, **meta)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out
