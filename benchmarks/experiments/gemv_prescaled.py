"""Experimental x-stationary GEMV (kernel experiment, GPU; measured by sweep_gemv.py and
sweep_gemv_diag.py, not adopted: see docs/results.md, "Session 3").

The committed GEMV (pt2pass/lowering/kernels/gemv.py) re-does, for every chunk of every row
tile, the x work of the mantissa trick: gather through the permutation, convert to fp32, scale
slot i by 2**(8 - 2*(i % 4)), and sum x and x' per block (~1 instruction per weight at BN = 4).
Here a program owns one K chunk, prepares that x slice once (in registers) and walks many weight
rows, so the loop per weight is one LOP3 + one FFMA (+ a shift per 4 slots): 2.75 instructions
per weight in the SASS against 3.3-4.0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pt2pass.lowering.kernels.gemv import code_as_float

ONE_BITS = 0x3F800000


@triton.jit
def _term(words, xi, i: tl.constexpr, one_bits):
    return code_as_float(words, i, one_bits) * xi


# ---------------------------------------------------------------------------------------------
# x-stationary split-K GEMV: a program owns one K chunk of NBT blocks (x of the chunk prepared
# once, in registers: gathered, scaled and summed per block) and walks ROWS rows of W in steps of
# BN. No masks in the loop: row and block indices are clamped to valid memory and the clamped
# blocks contribute 0 (x, c and s are 0 there); only the store is masked.


@triton.jit
def _xslot(x_row, perm_ptr, kk, i: tl.constexpr, ok, HAS_PERM: tl.constexpr):
    k = kk + 8 * i
    if HAS_PERM:
        k = tl.load(perm_ptr + k, mask=ok, other=0)
    return tl.load(x_row + k, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _scaled(x, i: tl.constexpr):
    return x * (1 << (8 - 2 * (i % 4)))


@triton.jit
def gemv_xstat_kernel(x_ptr, perm_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, out_ptr,
                      M, N, KW, NB, stride_xm, ROWS, one_bits,
                      HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT_OUT: tl.constexpr,
                      PREFETCH: tl.constexpr, BN: tl.constexpr, NBT: tl.constexpr,
                      STAGES: tl.constexpr = 1, LOAD_ONLY: tl.constexpr = False):
    m = tl.program_id(0)  # fastest: the M programs of one row group share its words through L2
    pid_g = tl.program_id(1)
    pid_c = tl.program_id(2)
    ib = tl.arange(0, NBT)
    ij = tl.arange(0, 8)
    blk = pid_c * NBT + ib
    blk_ok = blk < NB
    blk_ld = tl.minimum(blk, NB - 1)
    kk = blk[:, None] * 128 + ij[None, :]
    ok = blk_ok[:, None]
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    x0 = _xslot(x_row, perm_ptr, kk, 0, ok, HAS_PERM)
    x1 = _xslot(x_row, perm_ptr, kk, 1, ok, HAS_PERM)
    x2 = _xslot(x_row, perm_ptr, kk, 2, ok, HAS_PERM)
    x3 = _xslot(x_row, perm_ptr, kk, 3, ok, HAS_PERM)
    x4 = _xslot(x_row, perm_ptr, kk, 4, ok, HAS_PERM)
    x5 = _xslot(x_row, perm_ptr, kk, 5, ok, HAS_PERM)
    x6 = _xslot(x_row, perm_ptr, kk, 6, ok, HAS_PERM)
    x7 = _xslot(x_row, perm_ptr, kk, 7, ok, HAS_PERM)
    x8 = _xslot(x_row, perm_ptr, kk, 8, ok, HAS_PERM)
    x9 = _xslot(x_row, perm_ptr, kk, 9, ok, HAS_PERM)
    x10 = _xslot(x_row, perm_ptr, kk, 10, ok, HAS_PERM)
    x11 = _xslot(x_row, perm_ptr, kk, 11, ok, HAS_PERM)
    x12 = _xslot(x_row, perm_ptr, kk, 12, ok, HAS_PERM)
    x13 = _xslot(x_row, perm_ptr, kk, 13, ok, HAS_PERM)
    x14 = _xslot(x_row, perm_ptr, kk, 14, ok, HAS_PERM)
    x15 = _xslot(x_row, perm_ptr, kk, 15, ok, HAS_PERM)
    sx = (x0 + x1 + x2 + x3) + (x4 + x5 + x6 + x7) + (x8 + x9 + x10 + x11) + (x12 + x13 + x14 + x15)
    # x' = x * 2**(8 - 2 (i % 4)); the slots with the same i % 4 share the scale
    sxs = ((x0 + x4 + x8 + x12) * 256.0 + (x1 + x5 + x9 + x13) * 64.0
           + (x2 + x6 + x10 + x14) * 16.0 + (x3 + x7 + x11 + x15) * 4.0)
    s = tl.sum(sx, axis=1)
    c = tl.sum(sxs, axis=1) + s
    x0 = _scaled(x0, 0)[None, :, :]
    x1 = _scaled(x1, 1)[None, :, :]
    x2 = _scaled(x2, 2)[None, :, :]
    x3 = _scaled(x3, 3)[None, :, :]
    x4 = _scaled(x4, 4)[None, :, :]
    x5 = _scaled(x5, 5)[None, :, :]
    x6 = _scaled(x6, 6)[None, :, :]
    x7 = _scaled(x7, 7)[None, :, :]
    x8 = _scaled(x8, 8)[None, :, :]
    x9 = _scaled(x9, 9)[None, :, :]
    x10 = _scaled(x10, 10)[None, :, :]
    x11 = _scaled(x11, 11)[None, :, :]
    x12 = _scaled(x12, 12)[None, :, :]
    x13 = _scaled(x13, 13)[None, :, :]
    x14 = _scaled(x14, 14)[None, :, :]
    x15 = _scaled(x15, 15)[None, :, :]
    r_lo = pid_g * ROWS
    r_hi = tl.minimum(r_lo + ROWS, N)
    woff = (blk_ld * 8)[None, :, None] + ij[None, None, :]
    ir = tl.arange(0, BN)
    if PREFETCH:
        nxt = tl.load(w_ptr + tl.minimum(r_lo + ir, N - 1).to(tl.int64)[:, None, None] * KW + woff)
    for r0 in tl.range(r_lo, r_hi, BN, num_stages=STAGES):
        rows = r0 + ir
        rows_ld = tl.minimum(rows, N - 1)
        if PREFETCH:
            words = nxt
            nxt = tl.load(w_ptr + tl.minimum(rows + BN, N - 1).to(tl.int64)[:, None, None] * KW + woff)
        else:
            words = tl.load(w_ptr + rows_ld.to(tl.int64)[:, None, None] * KW + woff)
        sofs = rows_ld[:, None] * NB + blk_ld[None, :]
        al = tl.load(a_ptr + sofs).to(tl.float32)
        mu = tl.load(mu_ptr + sofs).to(tl.float32)
        if LOAD_ONLY:  # diagnostic: the loads of the loop with next to no arithmetic
            pw = (words & 1).to(tl.float32) * x0
        else:
            pw = _term(words, x0, 0, one_bits)
            pw += _term(words, x1, 1, one_bits)
            pw += _term(words, x2, 2, one_bits)
            pw += _term(words, x3, 3, one_bits)
            pw += _term(words, x4, 4, one_bits)
            pw += _term(words, x5, 5, one_bits)
            pw += _term(words, x6, 6, one_bits)
            pw += _term(words, x7, 7, one_bits)
            pw += _term(words, x8, 8, one_bits)
            pw += _term(words, x9, 9, one_bits)
            pw += _term(words, x10, 10, one_bits)
            pw += _term(words, x11, 11, one_bits)
            pw += _term(words, x12, 12, one_bits)
            pw += _term(words, x13, 13, one_bits)
            pw += _term(words, x14, 14, one_bits)
            pw += _term(words, x15, 15, one_bits)
        p = tl.sum(pw, axis=2)
        y = tl.sum(al * (p - c[None, :]) + mu * s[None, :], axis=1)
        row_ok = rows < r_hi
        if SPLIT_OUT:
            tl.store(out_ptr + (pid_c * M + m) * N + rows, y, mask=row_ok)
        else:
            if HAS_BIAS:
                y += tl.load(bias_ptr + rows_ld).to(tl.float32)
            tl.store(out_ptr + m * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


def gemv_xstat(x, packed, alpha, mu, bias, perm, out, cfg, load_only=False):
    """cfg = (BN, NBT, ROWS, num_warps, PREFETCH[, STAGES]). Returns out (M, N)."""
    from pt2pass.lowering.kernels.common import splitk_reduce
    bn, nbt, rows, warps, prefetch = cfg[:5]
    stages = cfg[5] if len(cfg) > 5 else 1
    m, k = x.shape
    n, kw = packed.shape
    nb = k // 128
    chunks = triton.cdiv(nb, nbt)
    target = out if chunks == 1 else torch.empty((chunks, m, n), device=x.device, dtype=torch.float32)
    grid = (m, triton.cdiv(n, rows), chunks)
    gemv_xstat_kernel[grid](x, perm if perm is not None else packed, packed, alpha, mu,
                            bias if bias is not None else alpha, target, m, n, kw, nb, x.stride(0), rows,
                            ONE_BITS, HAS_BIAS=bias is not None, HAS_PERM=perm is not None,
                            SPLIT_OUT=chunks > 1, PREFETCH=prefetch, BN=bn, NBT=nbt, STAGES=stages,
                            LOAD_ONLY=load_only, num_warps=warps,
                            num_stages=1)
    if chunks > 1:
        splitk_reduce(target, bias, out)
    return out
