"""One GEMV launch for two or three ternary Linears that read the same x (q/k/v, gate/up), M = 1.

At batch 1 a decoder layer's q, k, v projections are three small GEMVs (4096 rows each for a 7B
model): each pays a launch, a ramp-up and a tail, and a split-K reduce when its N is too small to
fill the GPU. Here one launch covers the rows of all members, each program picking its member's
weight, scales, bias and output by its row block (scalar selects, once per program), so the layer
runs as one N = 12288 GEMV. The members keep their own buffers (nothing is concatenated: the
full-sequence graph shares them) and their own SSR permutations: :func:`prepack_x_group` prepares
x once per permutation in one launch (once in all without permutations), and the GEMV loop is
gemv_packed.py's :func:`gemv_tile`, unchanged.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .common import AUTOTUNE, INTERPRET, autotune, launch, store_gemv_row
from .gemv_packed import (FIXED_M1, M1_SHAPES, PREPACK, gemv_configs, gemv_tile, prepack_buffers, prepack_row,
                          prepack_x)

MAX_MEMBERS = 3


@triton.jit
def _pick(g, v0, v1, v2):
    """v0, v1 or v2 for member g (scalars or pointers)."""
    return tl.where(g == 0, v0, tl.where(g == 1, v1, v2))


def _padded(items: list) -> list:
    """Read-only arguments of unused member slots: the last member's (never read)."""
    return items + [items[-1]] * (MAX_MEMBERS - len(items))


@triton.jit
def _prepack_x_group_kernel(x_ptr, perm0, perm1, perm2, xp_ptr, inv_ptr, xs_ptr, KW, NB,
                            USE_ASM: tl.constexpr, NBT: tl.constexpr):
    """gemv_packed's prepack of the one x row, gathered through member g's permutation
    (g = program_id(1)) into row g of xp / inv / xs."""
    g = tl.program_id(1)
    g64 = g.to(tl.int64)
    prepack_row(x_ptr, _pick(g, perm0, perm1, perm2), xp_ptr + g64 * 8 * KW, inv_ptr + g64 * KW,
                xs_ptr + g64 * NB, KW, NB, True, USE_ASM, NBT)


def prepack_x_group(x: torch.Tensor, perms: Sequence[torch.Tensor]) -> tuple:
    """gemv_packed.prepack_x of the single row of x, once per permutation, in one launch:
    (xp int32 (G, 8, K/16), inv float32 (G, K/16), xs float32 (G, K/128)), row g for perms[g]."""
    k = x.shape[1]
    xp, inv, xs = prepack_buffers(len(perms), k, x.device)
    p = _padded(list(perms))
    launch(_prepack_x_group_kernel, (triton.cdiv(k // 128, PREPACK["NBT"]), len(perms)), x, p[0], p[1], p[2],
           xp, inv, xs, k // 16, k // 128, USE_ASM=not INTERPRET, **PREPACK)
    return xp, inv, xs


# The M = 1 configs of gemv_packed (same loop), keyed on the members' sizes.
@autotune(gemv_configs(M1_SHAPES), key=["N0", "N1", "N2", "KW"])
@triton.jit
def ternary_gemv_group_kernel(xp_ptr, inv_ptr, xs_ptr, w0, w1, w2, a0, a1, a2, mu0, mu1, mu2,
                              bias0, bias1, bias2, out0, out1, out2, N0, N1, N2, KW, NB,
                              X_PER_MEMBER: tl.constexpr, HAS_BIAS: tl.constexpr,
                              USE_ASM: tl.constexpr, BN: tl.constexpr, NBT: tl.constexpr):
    """Program p covers BN rows of member g: blocks [0, c0) are member 0's, [c0, c1) member 1's,
    the rest member 2's (c_i = cumulative cdiv(N_i, BN))."""
    pid = tl.program_id(0)
    c0 = tl.cdiv(N0, BN)
    c1 = c0 + tl.cdiv(N1, BN)
    g = (pid >= c0).to(tl.int32) + (pid >= c1).to(tl.int32)
    first = tl.where(g == 0, 0, tl.where(g == 1, c0, c1))
    n = _pick(g, N0, N1, N2)
    rows = (pid - first) * BN + tl.arange(0, BN)
    row_ok = rows < n
    xg = (g * X_PER_MEMBER).to(tl.int64)
    y = gemv_tile(xp_ptr + xg * 8 * KW, inv_ptr + xg * KW, xs_ptr + xg * NB, _pick(g, w0, w1, w2),
                  _pick(g, a0, a1, a2), _pick(g, mu0, mu1, mu2), rows, row_ok, 0, NB, KW, NB,
                  USE_ASM, BN, NBT)
    store_gemv_row(_pick(g, out0, out1, out2), _pick(g, bias0, bias1, bias2), y, rows, row_ok, 0, 0,
                   1, n, HAS_BIAS, False)


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
                       perm: List[Optional[torch.Tensor]], config=None) -> List[torch.Tensor]:
    """[x[:, perm_i] @ W_i^T + bias_i] for a single row x (1, K) bf16/fp16 with unit stride, 2 or 3
    members with the same K and scale dtype, each with a bias (one dtype) or none, likewise perm.
    ``config``: a fixed {"BN", "NBT", "num_warps"} (experiments), else autotuned / the default."""
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
    has_perm = perm[0] is not None
    xp, inv, xs = prepack_x_group(x, perm) if has_perm else prepack_x(x, None)
    outs = [torch.empty((1, p.shape[0]), device=x.device, dtype=x.dtype) for p in packed]
    # Unused member slots (N = 0, never written) get their own dummy outputs: under torch.compile
    # every written argument is cloned and written back, and one tensor in two written slots
    # would come back as the clone of the slot that no program wrote.
    spare = [torch.empty(1, device=x.device, dtype=x.dtype) for _ in range(MAX_MEMBERS - len(outs))]
    sizes = [p.shape[0] for p in packed] + [0] * len(spare)
    has_bias = bias[0] is not None
    args = (xp, inv, xs, *_padded(list(packed)), *_padded(list(alpha)), *_padded(list(mu)),
            *_padded(list(bias) if has_bias else list(alpha)), *outs, *spare, *sizes, kw, nb)
    meta = dict(X_PER_MEMBER=int(has_perm), HAS_BIAS=has_bias, USE_ASM=not INTERPRET)
    blocks = lambda bn: sum(triton.cdiv(p.shape[0], bn) for p in packed)  # noqa: E731
    if config is not None or not AUTOTUNE:
        cfg = dict(config or FIXED_M1)
        kernel = ternary_gemv_group_kernel.fn if AUTOTUNE else ternary_gemv_group_kernel
        launch(kernel, (blocks(cfg["BN"]),), *args, **meta, **cfg)
    else:
        launch(ternary_gemv_group_kernel, lambda META: (blocks(META["BN"]),), *args, **meta)
    return outs
