"""One GEMV launch for two or three ternary Linears that read the same x (q/k/v, gate/up), M = 1.

At batch 1 a decoder layer's q, k, v projections are three small GEMVs (4096 rows each for a 7B
model): each pays a launch, a ramp-up and a tail, and a split-K reduce when its N is too small to
fill the GPU. Here one launch covers the rows of all members, each program picking its member's
weight, scales, bias and output by its row block (scalar selects, once per program), so the layer
runs as one N = 12288 GEMV. The members keep their own buffers (nothing is concatenated: the
full-sequence graph shares them) and their own SSR permutations: :func:`quantize_x_group`
quantizes x once per permutation in one launch (once in all without permutations), and the GEMV
loop is gemv_dp2a.py's :func:`gemv_tile_dp2a` (int16 x, dp2a; TMA-streamed words on Hopper: each
program builds the descriptor of its member's weight), unchanged.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, PREPACK, autotune, launch, launch_tuned, prefetch_blocks, prefetch_weights,
                     store_gemv_row)
from .dp2a import quantize_row
from .gemv_dp2a import dp2a_configs, dp2a_launch, gemv_tile_dp2a, quantize_buffers, quantize_x, weight_source

MAX_MEMBERS = 3


@triton.jit
def pick_member(g, v0, v1, v2):
    """v0, v1 or v2 for member g (scalars or pointers)."""
    return tl.where(g == 0, v0, tl.where(g == 1, v1, v2))


def padded_members(items: list) -> list:
    """Read-only arguments of unused member slots: the last member's (never read)."""
    return items + [items[-1]] * (MAX_MEMBERS - len(items))


@triton.jit
def _quantize_x_group_kernel(x_ptr, perm0, perm1, perm2, xp_ptr, xscale_ptr, xint_ptr, xs_ptr, KW, NB,
                             NBT: tl.constexpr):
    """gemv_dp2a's quantization of the one x row, gathered through member g's permutation
    (g = program_id(1)) into row g of the buffers."""
    g = tl.program_id(1).to(tl.int64)
    quantize_row(x_ptr, pick_member(g, perm0, perm1, perm2), xp_ptr + g * 8 * KW, xscale_ptr + g * NB,
                 xint_ptr + g * NB, xs_ptr + g * NB, KW, NB, True, NBT)


def quantize_x_group(x: torch.Tensor, perms: Sequence[torch.Tensor]) -> tuple:
    """gemv_dp2a.quantize_x of the single row of x, once per permutation, in one launch: the four
    buffers with row g for perms[g]."""
    k = x.shape[1]
    bufs = quantize_buffers(len(perms), k, x.device)
    p = padded_members(list(perms))
    launch(_quantize_x_group_kernel, (triton.cdiv(k // 128, PREPACK["NBT"]), len(perms)), x, p[0], p[1], p[2],
           *bufs, k // 16, k // 128, **PREPACK)
    return bufs


@triton.jit
def ternary_gemv_group_kernel(xp_ptr, xscale_ptr, xint_ptr, xs_ptr, w0, w1, w2, a0, a1, a2, mu0, mu1, mu2,
                              bias0, bias1, bias2, out0, out1, out2, N0, N1, N2, KW, NB, ss_ptr, eps,
                              X_PER_MEMBER: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
                              NORM: tl.constexpr, NB_P2: tl.constexpr,
                              BN: tl.constexpr, NBT: tl.constexpr, USE_TMA: tl.constexpr, STAGES: tl.constexpr,
                              PREFETCH: tl.constexpr):
    """Program p covers BN rows of member g: blocks [0, c0) are member 0's, [c0, c1) member 1's,
    the rest member 2's (c_i = cumulative cdiv(N_i, BN)). NORM: x was quantized before its RMS
    normalization (norm_group.py): y is scaled by 1 / sqrt(mean(h^2) + eps), from the per-block
    sums of h^2 at ``ss_ptr`` (NB_P2 = NB rounded up to a power of two). PREFETCH: common.LATENCY
    (its dependent launch is not used here: the group's launchers quantize x in several ways)."""
    pid = tl.program_id(0)
    c0 = tl.cdiv(N0, BN)
    c1 = c0 + tl.cdiv(N1, BN)
    g = (pid >= c0).to(tl.int32) + (pid >= c1).to(tl.int32)
    first = tl.where(g == 0, 0, tl.where(g == 1, c0, c1))
    n = pick_member(g, N0, N1, N2)
    row0 = (pid - first) * BN
    xg = (g * X_PER_MEMBER).to(tl.int64)
    w, a, mu = pick_member(g, w0, w1, w2), pick_member(g, a0, a1, a2), pick_member(g, mu0, mu1, mu2)
    rows = row0 + tl.arange(0, BN)
    if PREFETCH > 0:
        prefetch_weights(w, a, mu, rows, rows < n, 0, NB, KW, NB, 8, PREFETCH)
    y = gemv_tile_dp2a(xp_ptr + xg * 8 * KW, xscale_ptr + xg * NB, xint_ptr + xg * NB, xs_ptr + xg * NB,
                       weight_source(w, n, KW, BN, NBT, USE_TMA), a, mu, n, row0, 0, NB, KW, NB, USE_ASM, BN, NBT,
                       USE_TMA, STAGES)
    if NORM:
        blk = tl.arange(0, NB_P2)
        ss = tl.load(ss_ptr + xg * NB + blk, mask=blk < NB, other=0.0)
        # eps cast: Inductor passes a Python float as fp64 (docs/design.md, known hazards)
        y = y * tl.rsqrt(tl.sum(ss, axis=0) / (NB * 128) + tl.cast(eps, tl.float32))
    store_gemv_row(pick_member(g, out0, out1, out2), pick_member(g, bias0, bias1, bias2), y, rows, rows < n, 0, 0,
                   1, n, HAS_BIAS, False)


# The configs of gemv_dp2a (same loop), keyed on the members' sizes.
_GROUP = {tma: autotune(dp2a_configs(tma), ["N0", "N1", "N2", "KW"])(ternary_gemv_group_kernel)
          for tma in (False, True)}


def members_mismatch(alpha, mu, bias, perm) -> Optional[str]:
    """Why the members cannot share one launch (None when they can): the kernel takes one scale
    dtype, and bias / permutation flags and pointer types from member 0 for all."""
    for name, values in (("bias", bias), ("perm", perm)):
        if len({None if v is None else v.dtype for v in values}) != 1:
            return (f"needs every member's {name} present with one dtype, or none: got "
                    f"{[None if v is None else v.dtype for v in values]}")
    if len({a.dtype for a in alpha} | {m.dtype for m in mu}) != 1:
        return "needs one dtype for every member's alpha and mu"
    return None


def ternary_gemv_group(x: torch.Tensor, packed: List[torch.Tensor], alpha: List[torch.Tensor],
                       mu: List[torch.Tensor], bias: List[Optional[torch.Tensor]],
                       perm: List[Optional[torch.Tensor]], config=None, tma=None) -> List[torch.Tensor]:
    """[x[:, perm_i] @ W_i^T + bias_i] for a single row x (1, K) bf16/fp16 with unit stride, 2 or 3
    members with the same K and scale dtype, each with a bias (one dtype) or none, likewise perm.
    ``config``: a fixed {"BN", "NBT", "num_warps"[, "STAGES"]} (experiments), else autotuned / the
    default. ``tma``: allow reading the weights with TMA (default: where supported), as in gemv_dp2a."""
    check_group_args(x, packed, alpha, mu, bias, perm)
    xq = quantize_x_group(x, perm) if perm[0] is not None else quantize_x(x, None)
    return launch_group(xq, x, packed, alpha, mu, bias, perm[0] is not None, config, tma)


def check_group_args(x: torch.Tensor, packed, alpha, mu, bias, perm) -> None:
    """Raise ValueError unless :func:`ternary_gemv_group` covers these arguments."""
    if x.shape[0] != 1 or x.dtype not in (torch.bfloat16, torch.float16) or x.stride(1) != 1:
        raise ValueError(f"ternary_gemv_group takes one bf16/fp16 row with unit stride, got "
                         f"{tuple(x.shape)} {x.dtype}")
    if not 2 <= len(packed) <= MAX_MEMBERS:
        raise ValueError(f"ternary_gemv_group takes 2 to {MAX_MEMBERS} members, got {len(packed)}")
    k = x.shape[1]
    kw, nb = k // 16, k // 128
    if k % 128 or any(p.shape[1] != kw or a.shape != (p.shape[0], nb) for p, a in zip(packed, alpha)):
        raise ValueError(f"ternary_gemv_group needs K % 128 == 0 and every member (N_i, K/16) with "
                         f"(N_i, K/128) scales; got K={k}")
    mismatch = members_mismatch(alpha, mu, bias, perm)
    if mismatch:
        raise ValueError(f"ternary_gemv_group: {mismatch}")


def launch_group(xq: tuple, x: torch.Tensor, packed, alpha, mu, bias, x_per_member: bool, config=None,
                 tma=None, norm: Optional[tuple] = None) -> List[torch.Tensor]:
    """The grouped GEMV launch on the quantized x ``xq`` (one row per member with
    ``x_per_member``, else one for all); outputs of x's dtype and device. ``norm``: (per-block
    sums of h^2, eps) when x was quantized before its RMS normalization (norm_group.py)."""
    kw, nb = packed[0].shape[1], alpha[0].shape[1]
    outs = [torch.empty((1, p.shape[0]), device=x.device, dtype=x.dtype) for p in packed]
    # Unused member slots (N = 0, never written) get their own dummy outputs: under torch.compile
    # every written argument is cloned and written back, and one tensor in two written slots
    # would come back as the clone of the slot that no program wrote.
    spare = [torch.empty(1, device=x.device, dtype=x.dtype) for _ in range(MAX_MEMBERS - len(outs))]
    sizes = [p.shape[0] for p in packed] + [0] * len(spare)
    has_bias = bias[0] is not None
    ss, eps = norm if norm is not None else (xq[1], 0.0)  # unread without NORM
    args = (*xq, *padded_members(list(packed)), *padded_members(list(alpha)), *padded_members(list(mu)),
            *padded_members(list(bias) if has_bias else list(alpha)), *outs, *spare, *sizes, kw, nb, ss, eps)
    meta = dict(X_PER_MEMBER=int(x_per_member), HAS_BIAS=has_bias, USE_ASM=not INTERPRET, NORM=norm is not None,
                NB_P2=triton.next_power_of_2(nb), PREFETCH=prefetch_blocks())
    blocks = lambda bn: sum(triton.cdiv(p.shape[0], bn) for p in packed)  # noqa: E731
    kernel, fixed, config = dp2a_launch(_GROUP, tma, config, packed)
    launch_tuned(kernel, lambda bn: (blocks(bn),), fixed, config, *args, **meta)
    return outs
