"""Experimental (session 8, how the TMA GEMV started): the dp2a GEMV with the weight words read
through a tensor descriptor built on the host (``TensorDescriptor.from_tensor``) instead of in the
kernel.

Session 7's profile of the plain-load loop: it issues in ~12 us and streams in ~24 us on
28672x8192, yet took 37.7 us, because a warp waits for its words and then computes, and 8-16
resident warps do not cover the memory latency. Streaming the words by TMA (bulk copies into
shared memory, pipelined STAGES - 1 iterations ahead) fixed most of that; this host-descriptor
version measured it first and stays ~7 % faster on the large shapes (docs/results.md, session 8).
The library cannot use it: torch.compile traces a triton_op's body without Dynamo, and that
tracer does not capture TMA descriptors; gemv_dp2a.py builds its descriptor in the kernel
(:func:`weight_source`). Everything else is the committed loop, :func:`gemv_tile_dp2a`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pt2pass.lowering.kernels.common import launch_args, splitk_reduce, store_gemv_row
from pt2pass.lowering.kernels.gemv_dp2a import gemv_tile_dp2a, quantize_x


@triton.jit
def gemv_dp2a_host_desc_kernel(xp_ptr, xscale_ptr, xint_ptr, xs_ptr, w_desc, a_ptr, mu_ptr, bias_ptr, out_ptr,
                               M, N, KW, NB, blocks_per_split,
                               HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr, USE_ASM: tl.constexpr,
                               BN: tl.constexpr, NBT: tl.constexpr, STAGES: tl.constexpr):
    """ternary_gemv_dp2a_kernel with ``w_desc`` a host-built descriptor of W, block (BN, 8 NBT)."""
    pid_k = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    row0 = tl.program_id(0) * BN
    b_lo = pid_k * blocks_per_split
    y = gemv_tile_dp2a(xp_ptr + m * 8 * KW, xscale_ptr + m * NB, xint_ptr + m * NB, xs_ptr + m * NB,
                       w_desc, a_ptr, mu_ptr, N, row0, b_lo, tl.minimum(b_lo + blocks_per_split, NB),
                       KW, NB, USE_ASM, BN, NBT, True, STAGES)
    rows = row0 + tl.arange(0, BN)
    store_gemv_row(out_ptr, bias_ptr, y, rows, rows < N, m, pid_k, M, N, HAS_BIAS, SPLIT_OUT)


def weight_descriptor(packed: torch.Tensor, bn: int, nbt: int):
    """Host-side TMA descriptor of the packed words, block (bn, 8 nbt)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(packed, [bn, 8 * nbt])


def gemv_dp2a_host_desc(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                        bias, perm, out: torch.Tensor, split: int, config: dict, w_desc=None) -> torch.Tensor:
    """ternary_gemv_dp2a with ``config`` = {"BN", "NBT", "num_warps", "STAGES"}; ``w_desc`` may be
    passed prebuilt (weight_descriptor) to keep host work out of timing."""
    args, split, target = launch_args("gemv_dp2a_host_desc", x, packed, alpha, mu, bias, perm, out, split)
    _, _, _, _, bias_arg, _, target, m, n, kw, nb, _, bps, _, _ = args
    if w_desc is None:
        w_desc = weight_descriptor(packed, config["BN"], config["NBT"])
    gemv_dp2a_host_desc_kernel[(triton.cdiv(n, config["BN"]), split, m)](
        *quantize_x(x, perm), w_desc, alpha, mu, bias_arg, target, m, n, kw, nb, bps,
        HAS_BIAS=bias is not None, SPLIT_OUT=split > 1, USE_ASM=x.device.type != "cpu", num_stages=1, **config)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out
