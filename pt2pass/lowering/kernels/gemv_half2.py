"""GEMV for M = 1 with bf16/fp16 activations, x prepared inside every program: two weights per
instruction in packed half2 math (half2.py).

Each program loads the x of its K range, takes the per-word power-of-two scale and packs the
half2 pairs itself, so that work is repeated once per BN output rows. From 32 M weights the dp2a
GEMV with its separate quantize launch (gemv_dp2a.py) is faster; below, on 4096x4096, that launch
costs more than it saves (H200, session 7: 6.0 vs 6.4 us; docs/results.md). The float32 GEMV (gemv.py) spends
~3 instructions per weight against ~1.8 here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, autotune, launch_args, launch_tuned, load_weight_tile, prefetch_blocks,
                     prefetch_weights, splitk_reduce, store_gemv_row)
from .half2 import inverse_scale, pair, word_dots, word_field


@triton.jit
def _load_x(x_row, perm_ptr, kk, ok, s: tl.constexpr, HAS_PERM: tl.constexpr):
    ks = kk + 8 * s
    if HAS_PERM:
        ks = tl.load(perm_ptr + ks, mask=ok, other=0)
    return tl.load(x_row + ks, mask=ok, other=0.0).to(tl.float32)


def _configs():
    # (rows per program, blocks per iteration, warps): the five best of the eight measured on the
    # H100 (docs/results.md, session 4); BN = 4 lost on every shape (x conversion per row).
    shapes = [(16, 16, 2), (16, 32, 4), (8, 32, 2), (32, 16, 4), (8, 16, 1)]
    return [triton.Config({"BN": bn, "NBT": nbt}, num_warps=w, num_stages=1) for bn, nbt, w in shapes]


@autotune(_configs(), key=["m_bucket", "N", "KW", "blocks_per_split"])
@triton.jit
def ternary_gemv_half2_kernel(x_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, perm_ptr, out_ptr,
                              M, N, KW, NB, stride_xm, blocks_per_split, one_bits, m_bucket,
                              HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr,
                              SPLIT_OUT: tl.constexpr, USE_ASM: tl.constexpr,
                              BN: tl.constexpr, NBT: tl.constexpr, PREFETCH: tl.constexpr):
    """PREFETCH: common.LATENCY (no PDL: x needs no launch of its own here)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    ib = tl.arange(0, NBT)
    ij = tl.arange(0, 8)
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    if PREFETCH > 0:
        prefetch_weights(w_ptr, a_ptr, mu_ptr, rows, row_ok, b_lo, b_hi, KW, NB, 8, PREFETCH)
    w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * KW
    acc = tl.zeros((BN, NBT), tl.float32)
    for b0 in range(b_lo, b_hi, NBT):
        blk = b0 + ib
        blk_ok = blk < b_hi
        words, al, mu = load_weight_tile(w_rows, a_ptr, mu_ptr, rows, row_ok, blk, blk_ok, NB)
        # x of slot s, word j: column 128 b + 8 s + j, as (NBT, 8) tensors
        kk = blk[:, None] * 128 + ij[None, :]
        xok = blk_ok[:, None]
        x0 = _load_x(x_row, perm_ptr, kk, xok, 0, HAS_PERM)
        x1 = _load_x(x_row, perm_ptr, kk, xok, 1, HAS_PERM)
        x2 = _load_x(x_row, perm_ptr, kk, xok, 2, HAS_PERM)
        x3 = _load_x(x_row, perm_ptr, kk, xok, 3, HAS_PERM)
        x4 = _load_x(x_row, perm_ptr, kk, xok, 4, HAS_PERM)
        x5 = _load_x(x_row, perm_ptr, kk, xok, 5, HAS_PERM)
        x6 = _load_x(x_row, perm_ptr, kk, xok, 6, HAS_PERM)
        x7 = _load_x(x_row, perm_ptr, kk, xok, 7, HAS_PERM)
        x8 = _load_x(x_row, perm_ptr, kk, xok, 8, HAS_PERM)
        x9 = _load_x(x_row, perm_ptr, kk, xok, 9, HAS_PERM)
        x10 = _load_x(x_row, perm_ptr, kk, xok, 10, HAS_PERM)
        x11 = _load_x(x_row, perm_ptr, kk, xok, 11, HAS_PERM)
        x12 = _load_x(x_row, perm_ptr, kk, xok, 12, HAS_PERM)
        x13 = _load_x(x_row, perm_ptr, kk, xok, 13, HAS_PERM)
        x14 = _load_x(x_row, perm_ptr, kk, xok, 14, HAS_PERM)
        x15 = _load_x(x_row, perm_ptr, kk, xok, 15, HAS_PERM)
        big = tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                         tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))
        big = tl.maximum(big, tl.maximum(
            tl.maximum(tl.maximum(tl.abs(x8), tl.abs(x9)), tl.maximum(tl.abs(x10), tl.abs(x11))),
            tl.maximum(tl.maximum(tl.abs(x12), tl.abs(x13)), tl.maximum(tl.abs(x14), tl.abs(x15)))))
        field = word_field(big)
        inv = inverse_scale(field)
        xsum = (((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))) + \
               (((x8 + x9) + (x10 + x11)) + ((x12 + x13) + (x14 + x15)))
        part = word_dots(words, pair(x0, x8, field, 0, USE_ASM), pair(x1, x9, field, 1, USE_ASM),
                         pair(x2, x10, field, 2, USE_ASM), pair(x3, x11, field, 3, USE_ASM),
                         pair(x4, x12, field, 4, USE_ASM), pair(x5, x13, field, 5, USE_ASM),
                         pair(x6, x14, field, 6, USE_ASM), pair(x7, x15, field, 7, USE_ASM), USE_ASM)
        p = tl.sum(part * inv[None, :, :], axis=2)
        s_b = tl.sum(xsum, axis=1)
        acc += al * p + mu * s_b[None, :]
    y = tl.sum(acc, axis=1)
    store_gemv_row(out_ptr, bias_ptr, y, rows, row_ok, m, pid_k, M, N, HAS_BIAS, SPLIT_OUT)


# Without autotuning: the smallest config keeps the interpreter fast; on a GPU the one within 10 %
# of the best on all seven measured shapes.
_FIXED_CONFIG = {"BN": 16, "NBT": 2} if INTERPRET else {"BN": 8, "NBT": 32, "num_warps": 2}


def ternary_gemv_half2(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                       bias, perm, out: torch.Tensor, split: int = 1, config=None) -> torch.Tensor:
    """y = x[:, perm] @ W^T + bias into ``out`` (M, N), x bf16/fp16 (M, K) with unit stride along K.
    ``config``: a fixed {"BN", "NBT", "num_warps"} (experiments), else autotuned / the default."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"ternary_gemv_half2 takes bf16/fp16 activations, got {x.dtype}")
    m, n = x.shape[0], packed.shape[0]
    args, split, target = launch_args("ternary_gemv_half2", x, packed, alpha, mu, bias, perm, out, split)
    meta = dict(HAS_BIAS=bias is not None, HAS_PERM=perm is not None, SPLIT_OUT=split > 1,
                USE_ASM=not INTERPRET, PREFETCH=prefetch_blocks())
    launch_tuned(ternary_gemv_half2_kernel, lambda bn: (triton.cdiv(n, bn), split, m), _FIXED_CONFIG, config,
                 *args, **meta)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out
