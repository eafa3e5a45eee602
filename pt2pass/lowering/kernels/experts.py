"""Grouped ternary GEMM for stacked MoE experts (``pt2pass::ternary_experts``, see experts_ops.py).

The rows of x arrive sorted by expert, expert e owning rows ``offs[e-1]:offs[e]``. The launcher
cuts every expert's rows into tiles of BM rows and lists the tiles on the device (a few small torch
ops over ``offs``: no host sync, so a CUDA graph can hold the launch); the grid is (N tiles, an
upper bound on the row tiles, ceil(S / BM) + E), and a program whose tile index lies past the last
tile does nothing. Each program computes a (BM, BN) tile of one expert like the dense GEMM
(gemm.py): per 128-column block, the block's words unpacked and folded with alpha / mu into the
weight tile (``_weight_tile``), x's rows gathered through the expert's permutation, ``tl.dot``
accumulating in float32. Rows past ``offs[-1]`` (transformers' expert-parallel sentinels) are in
no tile and stay zero.

BM (rows per tile) is chosen by the launcher, 16 for decode-sized row counts (a few rows per
expert) and 64 for prefill, since the tile table depends on it; the autotuner picks BN, warps and
stages per (BM, rows bucket, N, K). Untimed on a GPU so far (written in a session without one).
"""
from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from .common import AUTOTUNE, BLOCK, INTERPRET, ONE_BITS, autotune, dot_in_fp32, launch, m_bucket
from .dispatch import unsupported_reason
from .gemm import _weight_tile

log = logging.getLogger(__name__)


@triton.jit
def ternary_experts_kernel(x_ptr, w_ptr, a_ptr, mu_ptr, perm_ptr, out_ptr, tile_expert_ptr, tile_row_ptr,
                           tile_end_ptr, S, N, K, KW, NB, one_bits, rows_bucket,
                           HAS_PERM: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    e = tl.load(tile_expert_ptr + tile).to(tl.int64)
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    rm = row0 + tl.arange(0, BM)
    m_ok = (rm < row_end) & (rm < S)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    wrow = e * N + rn.to(tl.int64)  # row of the stacked (E * N, KW) words and (E * N, NB) scales
    ik = tl.arange(0, 128)
    ij = tl.arange(0, 8)
    acc = tl.zeros((BM, BN), tl.float32)
    nb = tl.where(row0 < row_end, NB, 0)  # an empty tile (past the last one) skips the loop
    for b in range(0, nb):
        words = tl.load(w_ptr + wrow[:, None] * KW + b * 8 + ij[None, :], mask=n_ok[:, None], other=0)
        al = tl.load(a_ptr + wrow * NB + b, mask=n_ok, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + wrow * NB + b, mask=n_ok, other=0.0).to(tl.float32)
        w = _weight_tile(words, (4.0 * al)[:, None], (mu - 5.0 * al)[:, None], one_bits)
        kk = b * 128 + ik
        if HAS_PERM:
            kk = tl.load(perm_ptr + e * K + kk)
        xt = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + kk[None, :], mask=m_ok[:, None], other=0.0)
        if DOT_F32:
            xt = xt.to(tl.float32)
        else:
            w = w.to(xt.dtype)
        acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee" if DOT_F32 else None)
    optr = out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def experts_tiles(offs: torch.Tensor, n_rows, bm: int):
    """(expert, first row, end row) of each of the ceil(n_rows / bm) + E row tiles, computed on
    offs's device; tiles past the last real one get expert E - 1 and an empty row range."""
    offs = offs.to(torch.int64)
    n_experts = offs.shape[0]
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    tiles = ((offs - starts).clamp(min=0) + bm - 1) // bm
    last_tile = torch.cumsum(tiles, 0)  # (E,): one past each expert's last tile
    t = torch.arange((n_rows + bm - 1) // bm + n_experts, device=offs.device)
    expert = torch.searchsorted(last_tile, t, right=True).clamp(max=n_experts - 1)
    row0 = starts[expert] + (t - (last_tile[expert] - tiles[expert])) * bm
    end = torch.where(t < last_tile[-1], offs[expert], row0)  # empty past the last tile
    return expert.to(torch.int32), row0, end


# BM -> (BN, warps, stages) of its autotune list; none spills (offline sm_90 build: at BM = 64, BN = 128
# spills with 4 and with 8 warps)
CONFIGS = {16: [(32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 3), (128, 8, 3)],
           64: [(32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3)]}
_FIXED = {"BN": 16} if INTERPRET else {"BN": 64, "num_warps": 4, "num_stages": 3}
_tuned = {bm: autotune([triton.Config({"BN": bn}, num_warps=w, num_stages=st) for bn, w, st in configs],
                       ["rows_bucket", "N", "K"])(ternary_experts_kernel) for bm, configs in CONFIGS.items()}


@functools.lru_cache(maxsize=16)
def _warn_fallback(reason: str) -> None:
    log.warning("pt2pass.ternary_experts: %s; looping over the experts with the plain-torch reference "
                "(a host sync per call: no CUDA graph)", reason)


def ternary_experts_triton(x: torch.Tensor, offs: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor,
                           mu: torch.Tensor, perm, block_size: int, tile=None) -> torch.Tensor:
    """ternary_experts with the grouped kernel where it applies (128-blocks, K % 128 == 0,
    float activations and scales), else the loop over experts. ``tile``: (BM, BN) instead of the
    launcher's choice (the tests run the prefill tile in the interpreter)."""
    reason = unsupported_reason(x, packed[0], alpha, block_size)
    if reason is not None:
        _warn_fallback(reason)
        return torch.ops.pt2pass.ternary_experts_loop(x, offs, packed, alpha, mu, perm, block_size)
    n_rows, k = x.shape
    n_experts, n, kw = packed.shape
    out = torch.zeros((n_rows, n), device=x.device, dtype=x.dtype)
    if n_rows == 0 or n == 0:
        return out
    x = x.contiguous()
    packed, alpha, mu = packed.contiguous(), alpha.contiguous(), mu.contiguous()
    perm = None if perm is None else perm.contiguous()
    # BM 16: decode leaves a few rows per expert; BN 16 keeps the interpreter's tiles small
    bm = 16 if INTERPRET or n_rows <= 16 * n_experts else 64
    config = None
    if tile is not None:
        bm, config = tile[0], dict(_FIXED, BN=tile[1])
    elif not AUTOTUNE:
        config = _FIXED
    expert, row0, end = experts_tiles(offs, n_rows, bm)
    args = (x, packed, alpha, mu, perm if perm is not None else packed, out, expert, row0, end, n_rows, n, k, kw,
            k // BLOCK, ONE_BITS, m_bucket(n_rows))
    meta = dict(HAS_PERM=perm is not None, DOT_F32=dot_in_fp32(x), BM=bm)
    if config is not None:
        launch(ternary_experts_kernel, (triton.cdiv(n, config["BN"]), expert.shape[0]), *args, **meta, **config)
    else:
        launch(_tuned[bm], lambda META: (triton.cdiv(n, META["BN"]), expert.shape[0]), *args, **meta)
    return out
