"""GEMV / split-K kernel for small M (decode): CUDA cores, one x row per program.

At M=1 the layer is memory bound: the kernel must stream N*K/4 bytes of codes plus the scales at
HBM speed, which leaves ~3 instructions per weight on an H100 (132 SMs x 128 lanes x ~1.9 GHz
against ~10^13 weights/s). The inner loop therefore spends per weight one LOP3 and one FFMA:

* The code of slot i is moved (one shift per 4 slots) to float mantissa bits p..p+1 with
  p = 15 + 2*(i % 4), masked and OR-ed with the bits of 1.0 (one LOP3): v = 1 + q * 2**(p-23),
  an exact float32 with no int->float conversion.
* x is pre-scaled by 2**(23-p) (exact) so that v * x' = x' + q * x; the x' part is removed per
  block with S'_b = sum(x'), so the block partial is P_b = S'_b + sum_k q_k x_k.
* With q = T + 1: y_n = sum_b alpha_nb * (P_b - S'_b - s_b) + mu_nb * s_b, s_b = sum_{k in b} x_k.

Layout (format.py, block-planar): a thread loads 4 consecutive words of a block (16 B, coalesced
across the warp) and for slot i needs x[128 b + 8 i + j .. +3]: contiguous, one vector load, shared
by all the rows the thread handles (BN rows per program, several per thread). The K range can be
split across programs (grid axis 1): partials go to a float32 workspace reduced by a second kernel.
Precision: the cancellation P - S' loses at most 8 of float32's 24 bits (relative ~1e-5).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (AUTOTUNE, INTERPRET, autotune, launch, launch_args, load_weight_tile, splitk_reduce,
                     store_gemv_row)


@triton.jit
def code_as_float(words, i: tl.constexpr, one_bits):
    """v = 1 + q * 2**(p-23), p = 15 + 2*(i % 4), for code slot i of every word: one shift per
    4 slots (shared by the slots with the same i // 4) and one LOP3."""
    P: tl.constexpr = 15 + 2 * (i % 4)
    SH: tl.constexpr = P - 2 * i
    if SH >= 0:
        t = words << SH
    else:
        t = words >> (-SH)
    return ((t & (3 << P)) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _slot_term(words, xi, i: tl.constexpr, one_bits):
    """v * x' for code slot i of every word: x' = x * 2**(23-p)."""
    P: tl.constexpr = 15 + 2 * (i % 4)
    return code_as_float(words, i, one_bits) * (xi * (1 << (23 - P)))[None, :, :]


@triton.jit
def _load_x(x_row, perm_ptr, kk, ok, HAS_PERM: tl.constexpr):
    if HAS_PERM:
        kk = tl.load(perm_ptr + kk, mask=ok, other=0)
    return tl.load(x_row + kk, mask=ok, other=0.0).to(tl.float32)


def _gemv_configs():
    # (rows per program, blocks per iteration, warps): the warp spans 16 blocks x 2 threads, the
    # rows of a program stay inside each thread (x loads amortized over BN rows).
    shapes = [(8, 16, 1), (8, 32, 2), (16, 16, 2), (16, 32, 4), (8, 64, 4), (4, 32, 2)]
    return [triton.Config({"BN": bn, "NBT": nbt}, num_warps=w, num_stages=1) for bn, nbt, w in shapes]


@autotune(_gemv_configs(), key=["m_bucket", "N", "KW", "blocks_per_split"])
@triton.jit
def ternary_gemv_kernel(x_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, perm_ptr, out_ptr,
                        M, N, KW, NB, stride_xm, blocks_per_split, one_bits, m_bucket,
                        HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT_OUT: tl.constexpr,
                        BN: tl.constexpr, NBT: tl.constexpr):
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
    w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * KW
    acc = tl.zeros((BN, NBT), tl.float32)
    # A plain loop: a register-prefetch of the next chunk (+ tl.range(num_stages=3), which then
    # streams x through shared memory) measured 10-25% slower on the H100 (more registers, fewer
    # warps per SM); see docs/results.md.
    for b0 in range(b_lo, b_hi, NBT):
        blk = b0 + ib
        blk_ok = blk < b_hi
        words, al, mu = load_weight_tile(w_rows, a_ptr, mu_ptr, rows, row_ok, blk, blk_ok, NB)
        kk = blk[:, None] * 128 + ij[None, :]  # x offsets of slot 0; slot i adds 8 * i
        xok = blk_ok[:, None]
        xi = _load_x(x_row, perm_ptr, kk, xok, HAS_PERM)
        pw = _slot_term(words, xi, 0, one_bits)
        sw = xi
        cw = xi * 256.0
        for i in tl.static_range(1, 16):
            xi = _load_x(x_row, perm_ptr, kk + 8 * i, xok, HAS_PERM)
            pw += _slot_term(words, xi, i, one_bits)
            sw += xi
            cw += xi * (1 << (8 - 2 * (i % 4)))
        s = tl.sum(sw, axis=1)
        c = tl.sum(cw, axis=1) + s  # S'_b + s_b
        p = tl.sum(pw, axis=2)
        acc += al * (p - c[None, :]) + mu * s[None, :]
    y = tl.sum(acc, axis=1)
    store_gemv_row(out_ptr, bias_ptr, y, rows, row_ok, m, pid_k, M, N, HAS_BIAS, SPLIT_OUT)


# Without autotuning: the smallest config keeps the interpreter (CPU tests) fast; on a GPU a good one.
_FIXED_CONFIG = {"BN": 16, "NBT": 2} if INTERPRET else {"BN": 4, "NBT": 32, "num_warps": 2}


def gemv_split(m: int, n: int, nb: int, sms: int, rows_per_program: int = 8, min_blocks: int = 4) -> int:
    """K splits so that at least ~2 programs per SM exist when N is small (``rows_per_program``
    rows of W per program, each split at least ``min_blocks`` blocks long)."""
    programs = triton.cdiv(n, rows_per_program) * m
    if programs >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), nb // min_blocks))


def ternary_gemv(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                 bias, perm, out: torch.Tensor, split: int = 1) -> torch.Tensor:
    """y = x[:, perm] @ W^T + bias into ``out`` (M, N); x (M, K) with unit stride along K."""
    m, n = x.shape[0], packed.shape[0]
    args, split, target = launch_args("ternary_gemv", x, packed, alpha, mu, bias, perm, out, split)
    meta = dict(HAS_BIAS=bias is not None, HAS_PERM=perm is not None, SPLIT_OUT=split > 1)
    if not AUTOTUNE:
        cfg = _FIXED_CONFIG
        launch(ternary_gemv_kernel, (triton.cdiv(n, cfg["BN"]), split, m), *args, **meta, **cfg)
    else:
        launch(ternary_gemv_kernel, lambda META: (triton.cdiv(n, META["BN"]), split, m), *args, **meta)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out
