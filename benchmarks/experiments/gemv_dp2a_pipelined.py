"""Experimental (session 8, how the TMA GEMV started): the dp2a GEMV (pt2pass/lowering/kernels/
gemv_dp2a.py) with its K loop software pipelined, to put more bytes in flight per SM (session 7's
profile: the loop issues in ~12 us and streams in ~24 us on 28672x8192, yet takes 37.7 us, because a warp waits for its words and then
computes, and 8-16 resident warps do not cover the memory latency).

Two ways, chosen by constexprs:
- ``STAGES`` > 1: ``tl.range(..., num_stages=STAGES)``: Triton's pipeliner turns every load of
  the loop into cp.async copies into shared memory, STAGES - 1 iterations ahead (offline sm_90
  build, BN 8, NBT 16, 2 warps: 96 registers instead of 125, LDGSTS instead of LDG);
- ``USE_TMA``: the weight words come through a host-built tensor descriptor (TMA bulk copies of
  a (BN, 8 NBT) tile into shared memory, pipelined the same way; 71-96 registers).
It won (docs/results.md, session 8), and gemv_dp2a.py now streams with TMA through a device-side
descriptor (host-built ones cannot be traced by torch.compile inside a triton_op); this file keeps
the host-descriptor variant as the reference it was measured against. Same arithmetic as the
committed kernel (bit-identical in the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pt2pass.lowering.kernels.common import launch_args, load_pairs, load_weight_tile, splitk_reduce, store_gemv_row
from pt2pass.lowering.kernels.dp2a import word_dots
from pt2pass.lowering.kernels.gemv_dp2a import quantize_x


@triton.jit
def gemv_dp2a_pipelined_kernel(xp_ptr, xscale_ptr, xint_ptr, xs_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, out_ptr,
                               M, N, KW, NB, blocks_per_split,
                               HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr, USE_ASM: tl.constexpr,
                               BN: tl.constexpr, NBT: tl.constexpr, STAGES: tl.constexpr, USE_TMA: tl.constexpr):
    """One row of x (program_id 2) against BN rows of W; ``w_ptr`` is a tensor descriptor of the
    packed (N, KW) words with block (BN, 8 NBT) when USE_TMA."""
    pid_k = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    row0 = tl.program_id(0) * BN
    rows = row0 + tl.arange(0, BN)
    row_ok = rows < N
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)
    xp_row = xp_ptr + m * 8 * KW
    acc_w = tl.zeros((BN, NBT, 8), tl.float32)
    acc_b = tl.zeros((BN, NBT), tl.float32)
    for b0 in tl.range(b_lo, b_hi, NBT, num_stages=STAGES):
        blk = b0 + tl.arange(0, NBT)
        blk_ok = blk < b_hi
        if USE_TMA:
            # out-of-range rows / columns read 0; words of the next split's blocks meet alpha = 0
            words = tl.reshape(w_ptr.load([row0, b0 * 8]), (BN, NBT, 8))
            sofs = rows[:, None] * NB + blk[None, :]
            smask = row_ok[:, None] & blk_ok[None, :]
            al = tl.load(a_ptr + sofs, mask=smask, other=0.0).to(tl.float32)
            mu = tl.load(mu_ptr + sofs, mask=smask, other=0.0).to(tl.float32)
        else:
            w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * KW
            words, al, mu = load_weight_tile(w_rows, a_ptr, mu_ptr, rows, row_ok, blk, blk_ok, NB)
        col = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
        cok = blk_ok[:, None] & (col >= 0)
        p0, p1, p2, p3, p4, p5, p6, p7 = load_pairs(xp_row, col, cok, KW)
        scale = tl.load(xscale_ptr + m * NB + blk, mask=blk_ok, other=0.0)
        xint = tl.load(xint_ptr + m * NB + blk, mask=blk_ok, other=0).to(tl.float32)
        xs = tl.load(xs_ptr + m * NB + blk, mask=blk_ok, other=0.0)
        a_s = al * scale[None, :]
        acc_w += word_dots(words, p0, p1, p2, p3, p4, p5, p6, p7, USE_ASM).to(tl.float32) * a_s[:, :, None]
        acc_b += mu * xs[None, :] - a_s * xint[None, :]
    y = tl.sum(tl.sum(acc_w, axis=2) + acc_b, axis=1)
    store_gemv_row(out_ptr, bias_ptr, y, rows, row_ok, m, pid_k, M, N, HAS_BIAS, SPLIT_OUT)


def weight_descriptor(packed: torch.Tensor, bn: int, nbt: int):
    """Host-side TMA descriptor of the packed words, block (bn, 8 nbt)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(packed, [bn, 8 * nbt])


def gemv_dp2a_pipelined(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                        bias, perm, out: torch.Tensor, split: int, config: dict, w_desc=None) -> torch.Tensor:
    """ternary_gemv_dp2a with ``config`` = {"BN", "NBT", "num_warps", "STAGES", "USE_TMA"}; with
    USE_TMA, ``w_desc`` may be passed prebuilt (weight_descriptor) to keep host work out of timing."""
    args, split, target = launch_args("gemv_dp2a_pipelined", x, packed, alpha, mu, bias, perm, out, split)
    _, _, _, _, bias_arg, _, target, m, n, kw, nb, _, bps, _, _ = args
    cfg = dict(config)
    w = packed
    if cfg["USE_TMA"]:
        w = w_desc if w_desc is not None else weight_descriptor(packed, cfg["BN"], cfg["NBT"])
    interpret = x.device.type == "cpu"
    gemv_dp2a_pipelined_kernel[(triton.cdiv(n, cfg["BN"]), split, m)](
        *quantize_x(x, perm), w, alpha, mu, bias_arg, target, m, n, kw, nb, bps,
        HAS_BIAS=bias is not None, SPLIT_OUT=split > 1, USE_ASM=not interpret, num_stages=1, **cfg)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out
