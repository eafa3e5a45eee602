"""GEMV for M = 2 with bf16/fp16 activations (half2 arithmetic), x prepacked once per call.

gemv_half2.py prepares x inside every program (load, per-word scale, half2 packing, block sums):
that work is repeated N / BN times. Here :func:`prepack_x` does it once per call in a small kernel
(~2 us on the H200, the permutation gathered there too), and the loop decodes each word once
(:data:`DECODE_ASM`) and multiplies it with both rows of x (:data:`DOT_ASM`), accumulating per word
(alpha / c folded in one multiply) and reducing across threads once at the end: 1.36x bf16 geomean
over the seven benchmark shapes, against 1.03x for the tensor-core GEMM that ran M = 2 before
(H200, session 5). Its one-row kernel (M = 1) gave way to gemv_dp2a.py in session 7.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, PREPACK, autotune, gemv_configs, launch, launch_args, launch_tuned, load_pairs,
                     load_weight_tile, splitk_reduce, store_gemv_rows, x_column_stats)
from .half2 import DECODE_ASM, DOT_ASM, emulated_word_dots, inverse_scale, pair, word_field

MAX_ROWS = 2  # rows of x per program: at 4 the per-row work made it slower than the GEMM


@triton.jit
def prepack_row(x_row, perm_ptr, xp_row, inv_row, xs_row, KW, NB,
                HAS_PERM: tl.constexpr, USE_ASM: tl.constexpr, NBT: tl.constexpr):
    """For one x row (``x_row``, gathered through ``perm_ptr``) and this program's NBT blocks:
    per word column c = 8 b + j (the 16 columns 128 b + 8 s + j, s = 0..15) the half2 pairs
    xp[s, c] = x' of slots (s, s + 8) and inv[c] = 1 / c, and per block b the sum xs[b] of its
    128 x (the mu term)."""
    blk = tl.program_id(0) * NBT + tl.arange(0, NBT)
    ij = tl.arange(0, 8)
    ok = (blk < NB)[:, None] & (ij < 8)[None, :]
    col = blk[:, None] * 8 + ij[None, :]
    big, total = x_column_stats(x_row, perm_ptr, blk, ok, HAS_PERM, NBT)
    field = word_field(big)
    for s in tl.static_range(8):  # second pass over the 16 columns (L1 hits): fewer live registers
        ks = blk[:, None] * 128 + 8 * s + ij[None, :]
        ks_hi = ks + 64
        if HAS_PERM:
            ks = tl.load(perm_ptr + ks, mask=ok, other=0)
            ks_hi = tl.load(perm_ptr + ks_hi, mask=ok, other=0)
        lo = tl.load(x_row + ks, mask=ok, other=0.0).to(tl.float32)
        hi = tl.load(x_row + ks_hi, mask=ok, other=0.0).to(tl.float32)
        tl.store(xp_row + s * KW + col, pair(lo, hi, field, s, USE_ASM), mask=ok)
    tl.store(inv_row + col, inverse_scale(field), mask=ok)
    tl.store(xs_row + blk, tl.sum(total, axis=1), mask=blk < NB)


@triton.jit
def _prepack_x_kernel(x_ptr, perm_ptr, xp_ptr, inv_ptr, xs_ptr, KW, NB, stride_xm,
                      HAS_PERM: tl.constexpr, USE_ASM: tl.constexpr, NBT: tl.constexpr):
    """:func:`prepack_row` for x row m = program_id(1): xp (M, 8, KW), inv (M, KW), xs (M, NB)."""
    m = tl.program_id(1).to(tl.int64)
    prepack_row(x_ptr + m * stride_xm, perm_ptr, xp_ptr + m * 8 * KW, inv_ptr + m * KW, xs_ptr + m * NB,
                KW, NB, HAS_PERM, USE_ASM, NBT)


def prepack_buffers(rows: int, k: int, device) -> tuple:
    """Empty (xp int32 (rows, 8, K/16), inv float32 (rows, K/16), xs float32 (rows, K/128))."""
    return (torch.empty((rows, 8, k // 16), device=device, dtype=torch.int32),
            torch.empty((rows, k // 16), device=device, dtype=torch.float32),
            torch.empty((rows, k // 128), device=device, dtype=torch.float32))


def prepack_x(x: torch.Tensor, perm) -> tuple:
    """(xp int32 (M, 8, K/16), inv float32 (M, K/16), xs float32 (M, K/128)) of x[:, perm]."""
    m, k = x.shape
    kw, nb = k // 16, k // 128
    xp, inv, xs = prepack_buffers(m, k, x.device)
    launch(_prepack_x_kernel, (triton.cdiv(nb, PREPACK["NBT"]), m), x, perm if perm is not None else xp,
           xp, inv, xs, kw, nb, x.stride(0), HAS_PERM=perm is not None, USE_ASM=not INTERPRET, **PREPACK)
    return xp, inv, xs


@autotune(gemv_configs([(16, 8, 2), (16, 16, 4), (32, 8, 4)]), key=["m_bucket", "N", "KW", "blocks_per_split"])
@triton.jit
def ternary_gemv_packed_rows_kernel(xp_ptr, inv_ptr, xs_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, out_ptr,
                                    M, N, KW, NB, blocks_per_split, m_bucket,
                                    HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr,
                                    USE_ASM: tl.constexpr, BM: tl.constexpr,
                                    BN: tl.constexpr, NBT: tl.constexpr):
    """BM rows of x against BN rows of W: each word decoded once, multiplied with every row."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
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
        inv = tl.load(inv_ptr + msafe[:, None, None] * KW + col, mask=cok, other=0.0)
        xs = tl.load(xs_ptr + msafe[:, None] * NB + blk[None, :], mask=blk_ok[None, :], other=0.0)
        if USE_ASM:
            t0, t1, t2, t3, t4, t5, t6, t7 = tl.inline_asm_elementwise(
                DECODE_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], dtype=(tl.int32,) * 8,
                is_pure=True, pack=1)
            part = tl.inline_asm_elementwise(
                DOT_ASM, "=f,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
                [t0[None], t1[None], t2[None], t3[None], t4[None], t5[None], t6[None], t7[None],
                 p0[:, None], p1[:, None], p2[:, None], p3[:, None], p4[:, None], p5[:, None],
                 p6[:, None], p7[:, None]], dtype=tl.float32, is_pure=True, pack=1)
        else:
            part = emulated_word_dots(words[None], p0[:, None], p1[:, None], p2[:, None], p3[:, None],
                                      p4[:, None], p5[:, None], p6[:, None], p7[:, None])
        acc_w += part * (al[None, :, :, None] * inv[:, None, :, :])
        acc_b += mu[None, :, :] * xs[:, None, :]
    y = tl.sum(tl.sum(acc_w, axis=3) + acc_b, axis=2)  # (BM, BN)
    store_gemv_rows(out_ptr, bias_ptr, y, ms, m_ok, rows, row_ok, pid_k, M, N, HAS_BIAS, SPLIT_OUT)


# Without autotuning: the interpreter's smallest tile; on a GPU the best on most measured shapes.
_FIXED_ROWS = {"BN": 8, "NBT": 2} if INTERPRET else {"BN": 16, "NBT": 8, "num_warps": 2}


def ternary_gemv_packed(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                        bias, perm, out: torch.Tensor, split: int = 1, config=None) -> torch.Tensor:
    """y = x[:, perm] @ W^T + bias into ``out`` (M, N), x bf16/fp16 (M, K) with unit stride along K.
    Tiles of MAX_ROWS rows of x (the dispatcher sends M = 2 here; M = 1 goes to gemv_dp2a / gemv_half2).
    ``config``: a fixed {"BN", "NBT", "num_warps"} (experiments), else autotuned / the default."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"ternary_gemv_packed takes bf16/fp16 activations, got {x.dtype}")
    args, split, target = launch_args("ternary_gemv_packed", x, packed, alpha, mu, bias, perm, out, split)
    _, _, _, _, bias_arg, _, target, m, n, kw, nb, _, bps, _, bucket = args
    xp, inv, xs = prepack_x(x, perm)
    args = (xp, inv, xs, packed, alpha, mu, bias_arg, target, m, n, kw, nb, bps, bucket)
    meta = dict(HAS_BIAS=bias is not None, SPLIT_OUT=split > 1, USE_ASM=not INTERPRET, BM=MAX_ROWS)
    m_tiles = triton.cdiv(m, MAX_ROWS)
    launch_tuned(ternary_gemv_packed_rows_kernel, lambda bn: (triton.cdiv(n, bn), split, m_tiles), _FIXED_ROWS,
                 config, *args, **meta)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out
