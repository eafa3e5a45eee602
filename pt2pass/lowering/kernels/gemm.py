"""Tiled GEMM kernel for larger M (prefill): tensor cores, one 128-column scale block per K step.

Per K step the program loads the (BN, 8) words of one block for its BN output rows (16 B per
thread, coalesced), extracts the 16 code slots with one shift + one LOP3 each (v = 1 + q/4 exactly,
as a float32 bit pattern: no int->float conversion), folds the block's scales into the tile
(W = alpha * (q - 1) + mu = 4 alpha * v + (mu - 5 alpha): one FFMA per weight), rounds it to x's
dtype and interleaves the slots back into column order in registers (tl.join / permute / reshape:
slot i of word j is column 8 i + j, see format.py). The x tile is an ordinary (BM, 128) tile that
Triton pipelines into shared memory; tl.dot accumulates in float32. Two operand orders, both in the
autotune lists: unswapped, y = x W^T, the weight tile is the MMA's B operand, which wgmma reads
from shared memory (a store of the unpacked tile per K step; no wgmma below BM = 64); swapped
(``SWAP``), y^T = W x^T, the weight tile is the A operand, which wgmma takes from registers, and
x^T is B (wgmma m64nBM from 16 rows of x). Swapped was faster in 24 of 28 (shape, M) pairs at
32-256 rows of x on the H100, by up to 1.5x (docs/results.md, session 14), and is what lets
M = 256 run fused instead of dequantized.
Rounding the folded weight to bf16 costs ~2^-9 relative per weight, like a bf16 weight would.
Small M: the K range is split across programs (grid axis 1) into a float32 workspace.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import (AUTOTUNE, INTERPRET, ONE_BITS, autotune, dot_in_fp32, launch, launch_args,
                     splitk_reduce)


@triton.jit
def _slot(words, i: tl.constexpr, A, B, one_bits):
    """Folded weight of code slot i of every word: 4 alpha * (1 + q/4) + (mu - 5 alpha)."""
    SH: tl.constexpr = 21 - 2 * i
    if SH >= 0:
        t = words << SH
    else:
        t = words >> (-SH)
    v = ((t & (3 << 21)) | one_bits).to(tl.float32, bitcast=True)
    return A * v + B


@triton.jit
def _weight_tile(words, A, B, one_bits):
    """(BN, 8) words -> (BN, 128) folded weights in column order (column 8 i + j)."""
    w = tl.join(
        tl.join(tl.join(tl.join(_slot(words, 0, A, B, one_bits), _slot(words, 1, A, B, one_bits)),
                        tl.join(_slot(words, 2, A, B, one_bits), _slot(words, 3, A, B, one_bits))),
                tl.join(tl.join(_slot(words, 4, A, B, one_bits), _slot(words, 5, A, B, one_bits)),
                        tl.join(_slot(words, 6, A, B, one_bits), _slot(words, 7, A, B, one_bits)))),
        tl.join(tl.join(tl.join(_slot(words, 8, A, B, one_bits), _slot(words, 9, A, B, one_bits)),
                        tl.join(_slot(words, 10, A, B, one_bits), _slot(words, 11, A, B, one_bits))),
                tl.join(tl.join(_slot(words, 12, A, B, one_bits), _slot(words, 13, A, B, one_bits)),
                        tl.join(_slot(words, 14, A, B, one_bits), _slot(words, 15, A, B, one_bits)))))
    # w is (BN, 8[j], 2[i&1], 2[i>>1&1], 2[i>>2&1], 2[i>>3]): bring i's bits to the front, MSB first
    w = tl.permute(w, (0, 5, 4, 3, 2, 1))
    return tl.reshape(w, (w.shape[0], 128))


def _configs(shapes, swap=False):
    return [triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8, "SWAP": swap}, num_warps=w, num_stages=st)
            for bm, bn, w, st in shapes]


# (BM, BN, warps, stages). Small M runs with split-K, so tiles stay narrow; unswapped, BM >= 64 gets
# wgmma; swapped, BN >= 64 does (m64nBMk16), from 16 rows of x. None spills (offline sm_90 build).
_SMALL_M = (_configs([(16, 64, 4, 3), (16, 64, 4, 5), (16, 128, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4),
                      (64, 128, 4, 3)])
            + _configs([(16, 64, 4, 3), (16, 64, 4, 5), (16, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3),
                        (64, 128, 8, 3)], swap=True))
# (128, 256, 8), (256, 128, 8) and (128, 128, 4 warps) unswapped spill: left out
_LARGE_M = (_configs([(128, 128, 8, 3)])
            + _configs([(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4)],
                       swap=True))
SMALL_M_MAX = 64


@triton.jit
def ternary_gemm_kernel(x_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, perm_ptr, out_ptr,
                        M, N, KW, NB, stride_xm, blocks_per_split, one_bits, m_bucket,
                        HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT_OUT: tl.constexpr,
                        DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
                        SWAP: tl.constexpr):
    # grouped tile order so that consecutive programs share x tiles in L2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsz
    pid_n = (pid % width) // gsz
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    ik = tl.arange(0, 128)
    ij = tl.arange(0, 8)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * KW
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)
    acc = tl.zeros((BN, BM) if SWAP else (BM, BN), tl.float32)
    for b in range(b_lo, b_hi):
        words = tl.load(w_rows + b * 8 + ij[None, :], mask=n_ok[:, None], other=0)
        al = tl.load(a_ptr + rn * NB + b, mask=n_ok, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + rn * NB + b, mask=n_ok, other=0.0).to(tl.float32)
        w = _weight_tile(words, (4.0 * al)[:, None], (mu - 5.0 * al)[:, None], one_bits)
        kk = b * 128 + ik
        if HAS_PERM:
            kk = tl.load(perm_ptr + kk)
        xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
        if DOT_F32:
            xt = xt.to(tl.float32)
        else:
            w = w.to(xt.dtype)
        if SWAP:  # acc is y^T: the weight tile is the register operand (A) of the MMA, x^T the B
            acc = tl.dot(w, tl.trans(xt), acc, input_precision="ieee" if DOT_F32 else None)
        else:
            acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee" if DOT_F32 else None)
    if SWAP:
        acc = tl.trans(acc)
    if SPLIT_OUT:
        optr = out_ptr + (pid_k * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(optr, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        optr = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_KEY = ["m_bucket", "N", "KW", "blocks_per_split"]
_gemm_small = autotune(_SMALL_M, _KEY)(ternary_gemm_kernel)
_gemm_large = autotune(_LARGE_M, _KEY)(ternary_gemm_kernel)
# Without autotuning (interpreter / PT2PASS_AUTOTUNE=0): fixed configs.
# SWAP is always passed (no default in the signature): Inductor's launcher for a user Triton
# kernel (torch 2.11) passes the arguments positionally and fails on a defaulted constexpr left out.
_FIXED_SMALL = ({"BM": 16, "BN": 16, "GROUP_M": 4, "SWAP": False} if INTERPRET
                else {"BM": 16, "BN": 64, "GROUP_M": 8, "SWAP": False, "num_warps": 4, "num_stages": 3})
_FIXED_LARGE = ({"BM": 16, "BN": 16, "GROUP_M": 4, "SWAP": False} if INTERPRET
                else {"BM": 128, "BN": 128, "GROUP_M": 8, "SWAP": False, "num_warps": 8, "num_stages": 3})


def gemm_split(m: int, n: int, nb: int, sms: int) -> int:
    """K splits when the (BM=64, BN=128) tile grid leaves most SMs idle (small M)."""
    tiles = triton.cdiv(m, 64) * triton.cdiv(n, 128)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), nb // 8))


def ternary_gemm(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                 bias, perm, out: torch.Tensor, split: int = 1, config: Optional[dict] = None) -> torch.Tensor:
    """y = x[:, perm] @ W^T + bias into ``out`` (M, N); x (M, K) with unit stride along K.

    ``config`` (BM, BN, GROUP_M, SWAP, num_warps, num_stages) bypasses the autotuner:
    the experiments time every config, the tests run both MMA operand orders."""
    m, n = x.shape[0], packed.shape[0]
    args, split, target = launch_args("ternary_gemm", x, packed, alpha, mu, bias, perm, out, split)
    meta = dict(HAS_BIAS=bias is not None, HAS_PERM=perm is not None, SPLIT_OUT=split > 1,
                DOT_F32=dot_in_fp32(x))
    if config is not None or not AUTOTUNE:
        cfg = config or (_FIXED_SMALL if m <= SMALL_M_MAX else _FIXED_LARGE)
        grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]), split)
        launch(ternary_gemm_kernel, grid, *args, **meta, **cfg)
    else:
        kernel = _gemm_small if m <= SMALL_M_MAX else _gemm_large
        launch(kernel, lambda META: (triton.cdiv(m, META["BM"]) * triton.cdiv(n, META["BN"]), split), *args, **meta)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out


@triton.jit
def ternary_dequant_kernel(w_ptr, a_ptr, mu_ptr, out_ptr, N, KW, NB, one_bits, BN: tl.constexpr):
    """Dense W = alpha * T + mu (N, K) in out's dtype, one (BN, 128) block per program."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    b = tl.program_id(1)
    n_ok = rn < N
    words = tl.load(w_ptr + rn.to(tl.int64)[:, None] * KW + b * 8 + tl.arange(0, 8)[None, :], mask=n_ok[:, None])
    al = tl.load(a_ptr + rn * NB + b, mask=n_ok, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + rn * NB + b, mask=n_ok, other=0.0).to(tl.float32)
    w = _weight_tile(words, (4.0 * al)[:, None], (mu - 5.0 * al)[:, None], one_bits)
    optr = out_ptr + rn.to(tl.int64)[:, None] * (KW * 16) + b * 128 + tl.arange(0, 128)[None, :]
    tl.store(optr, w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


def ternary_dequant(packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense (N, K) weight in ``dtype`` (large-M path: dequantize once, then cuBLAS)."""
    n, kw = packed.shape
    nb = kw // 8
    out = torch.empty((n, kw * 16), device=packed.device, dtype=dtype)
    bn = 32
    launch(ternary_dequant_kernel, (triton.cdiv(n, bn), nb), packed, alpha, mu, out, n, kw, nb, ONE_BITS, BN=bn,
           num_warps=4)
    return out
