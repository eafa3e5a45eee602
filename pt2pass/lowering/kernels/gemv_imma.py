"""GEMV for 1-16 rows of bf16/fp16 x on the tensor cores: integer MMA with register fragments (imma.py).

x is quantized once per call by a small kernel into int16 per 128-block (as for the dp2a GEMV)
and laid out as the MMA's B fragments (high and low bytes, rows padded to 8 or 16 with zeros).
Each warp owns R tiles of 16 W rows; per block a lane loads one 64-bit word pair of each of its
two rows, turns them into A registers with shifts and masks, and issues 8 ``mma.sync`` per 8
rows of x (4 column steps x 2 byte halves); the float epilogue runs once per (row, x row, block).
So the cost per weight barely grows with M: per lane ~2.1 SASS instructions per weight at M <= 8
and ~3.5 at M <= 16 (offline sm_90 build, 4 blocks per iteration), against 1.75 per weight *per
row of x* for the dp2a GEMV and an unpack through shared memory for the GEMM.

Where K/128 is a multiple of 8 (ALIGNED; the launcher then rounds the K split to 8 blocks), each
lane loads alpha and mu of an iteration's NBT blocks as one vector per row (they are adjacent in a
row) and picks block u out of it in registers: 4 instead of 4 NBT scale loads per iteration, each
touching the 8 rows' cache lines. The kernel was bound by L1 throughput (Nsight Compute, session
18), so loads, not bytes, were the cost; with the x statistics block-major as well, the fixed
config's time fell 10-12 % on 28672x8192 (H100, session 19), less than the loads did. Since
session 20 the x side is vector loads too (imma.py's layout): per block and x tile a lane issues
4 16-byte fragment loads and 2 16-byte statistics records instead of 16 + 6 scalar loads; offline
sm_90 build of (1, 4, 4): 600 -> 528 instructions (one x tile), 928 -> 784 and 134 -> 94
registers (two).

Tensors in the kernel are (R, 32 WARPS): element (r, 32 w + lane) lives in lane ``lane`` of warp
w, which the MMA's fragment layout relies on (checked offline by tests/lowering/test_sm90_build.py
on the compiled layout, on the GPU by benchmarks/experiments/sweep_gemv_imma.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, PREPACK, autotune, latency_meta, launch, launch_args, launch_tuned, prefetch_weights,
                     splitk_reduce)
from .gemv import gemv_split
from .imma import FRAGMENT_WORDS, STAT_WORDS, block_products, pick, quantize_fragments

MAX_M = 16  # two 8-row tiles of x per MMA pair
SCALE_VECTOR = 8  # the largest NBT: K / 128 and the split multiples of it align the scale vectors


@triton.jit
def _quantize_x_imma_kernel(x_ptr, perm_ptr, xf_ptr, xstat_ptr, M, NB, stride_xm,
                            HAS_PERM: tl.constexpr, NBT: tl.constexpr, PDL: tl.constexpr):
    """:func:`imma.quantize_fragments` of x row m = program_id(1) (zeros for the padding rows m >= M);
    the statistics block-major, (K/128, rows, STAT_WORDS). PDL: as in gemv_dp2a's quantizer."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    m = tl.program_id(1).to(tl.int64)
    rows = tl.num_programs(1)
    x_row = x_ptr + tl.minimum(m, M - 1) * stride_xm
    xf_lane = xf_ptr + (m // 8) * NB * FRAGMENT_WORDS + (m % 8) * 16  # lanes 4 g .. 4 g + 3, 4 words each
    quantize_fragments(x_row, perm_ptr, xf_lane, xstat_ptr + m * STAT_WORDS, NB, rows * STAT_WORDS,
                       m < M, HAS_PERM, NBT)


def quantize_x_imma(x: torch.Tensor, perm, pdl: bool = False) -> tuple:
    """(xf int32 (tiles, K/128, 512), xstat float32 (K/128, 8 tiles, 4): s_b, X_b, sum(x), 0) of
    x[:, perm] (M <= 16 rows, padded with zero rows to 8 per tile). The statistics are block-major
    records so that the x rows a lane reads per block (2t, 2t + 1) are 32 adjacent bytes, two
    vector loads, and a warp's 8 rows one cache line: the GEMV was bound by L1 throughput (Nsight
    Compute, session 18: L1 82-91 % busy, DRAM 13-25 %), then by the loads it issues."""
    m, k = x.shape
    nb = k // 128
    rows = 8 * triton.cdiv(m, 8)
    xf = torch.empty((rows // 8, nb, FRAGMENT_WORDS.value), device=x.device, dtype=torch.int32)
    xstat = torch.empty((nb, rows, STAT_WORDS.value), device=x.device, dtype=torch.float32)
    launch(_quantize_x_imma_kernel, (triton.cdiv(nb, PREPACK["NBT"]), rows), x, perm if perm is not None else xf,
           xf, xstat, m, nb, x.stride(0), HAS_PERM=perm is not None, PDL=pdl, **PREPACK)
    return xf, xstat


@triton.jit
def _block_update(y0, y1, y2, y3, w_top, w_bot, xf_ptr, xstat_ptr, tile, b, b_ok, NB,
                  t, al_top, mu_top, al_bot, mu_bot, USE_ASM: tl.constexpr, R: tl.constexpr, WARPS: tl.constexpr,
                  TILES: tl.constexpr):
    """y0..y3 += block b's term for (top row, x row 2t), (top, 2t + 1), (bottom, 2t), (bottom, 2t + 1)
    of x-row tile ``tile``. Blocks past the split (not ``b_ok``) read zero codes and scales."""
    lane = tl.arange(0, 32 * WARPS)[None, :] % 32
    bc = tl.minimum(b, NB - 1)  # in bounds; its codes are masked to 0
    p0, p1, p2, p3 = block_products(w_top, w_bot, xf_ptr, (tile * NB + bc) * FRAGMENT_WORDS + 4 * lane,
                                    USE_ASM, R, WARPS)
    # the records of x rows 2t and 2t + 1 (block-major, quantize_x_imma): one 16-byte load each
    x0 = (bc * (8 * TILES) + tile * 8 + 2 * t) * STAT_WORDS
    rec = xstat_ptr + tl.multiple_of(x0[:, :, None] + tl.arange(0, STAT_WORDS)[None, None, :], [1, 1, STAT_WORDS])
    st0 = tl.load(rec, mask=b_ok, other=0.0)
    st1 = tl.load(rec + STAT_WORDS, mask=b_ok, other=0.0)
    s0, i0, z0 = pick(st0, 0), pick(st0, 1), pick(st0, 2)
    s1, i1, z1 = pick(st1, 0), pick(st1, 1), pick(st1, 2)
    # P and X are integers below 2^24, so P - X is exact in float32 (the dp2a GEMV's integers)
    y0 += al_top * s0 * (p0.to(tl.float32) - i0) + mu_top * z0
    y1 += al_top * s1 * (p1.to(tl.float32) - i1) + mu_top * z1
    y2 += al_bot * s0 * (p2.to(tl.float32) - i0) + mu_bot * z0
    y3 += al_bot * s1 * (p3.to(tl.float32) - i1) + mu_bot * z1
    return y0, y1, y2, y3


@triton.jit
def _store(out_ptr, bias_ptr, y, xr, rows, M, N, pid_k, HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr):
    """y[x row xr, W row rows]: float32 into the split-K workspace, else + bias in out's dtype."""
    ok = (xr < M) & (rows < N)
    if SPLIT_OUT:
        tl.store(out_ptr + (pid_k * M + xr) * N + rows, y, mask=ok)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + xr * N + rows, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _store_tile(out_ptr, bias_ptr, y0, y1, y2, y3, tile, t, rows, M, N, pid_k,
                HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr):
    xr = tile * 8 + 2 * t
    _store(out_ptr, bias_ptr, y0, xr, rows, M, N, pid_k, HAS_BIAS, SPLIT_OUT)
    _store(out_ptr, bias_ptr, y1, xr + 1, rows, M, N, pid_k, HAS_BIAS, SPLIT_OUT)
    _store(out_ptr, bias_ptr, y2, xr, rows + 8, M, N, pid_k, HAS_BIAS, SPLIT_OUT)
    _store(out_ptr, bias_ptr, y3, xr + 1, rows + 8, M, N, pid_k, HAS_BIAS, SPLIT_OUT)


@triton.jit
def _block_scales(a_ptr, mu_ptr, offsets, mask, CACHE: tl.constexpr):
    """alpha and mu (R, 32 WARPS, NBT) float32 at ``offsets``: one vector load per lane for the
    NBT blocks of an iteration (NBT loads of one element each touched as many cache lines), with the
    cache modifier CACHE."""
    return (tl.load(a_ptr + offsets, mask=mask, other=0.0, cache_modifier=CACHE).to(tl.float32),
            tl.load(mu_ptr + offsets, mask=mask, other=0.0, cache_modifier=CACHE).to(tl.float32))


@triton.jit
def ternary_gemv_imma_kernel(xf_ptr, xstat_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, out_ptr,
                             M, N, KW2, NB, blocks_per_split, m_bucket,
                             HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr, USE_ASM: tl.constexpr,
                             ALIGNED: tl.constexpr, TILES: tl.constexpr, R: tl.constexpr, WARPS: tl.constexpr,
                             NBT: tl.constexpr, STREAM_CG: tl.constexpr, PREFETCH: tl.constexpr,
                             PDL: tl.constexpr):
    """16 R WARPS rows of W (int64 word pairs, KW2 per row) per program, K blocks of split
    program_id(1), all TILES 8-row tiles of x. STREAM_CG: load the streamed data (words, alpha,
    mu) past L1 (".cg"), which then keeps the x fragments that every warp re-reads: off by default,
    an experiment's config can turn it on (benchmarks/experiments/sweep_gemv_imma.py). PREFETCH,
    PDL: common.LATENCY."""
    cache: tl.constexpr = ".cg" if STREAM_CG else ""
    pid_k = tl.program_id(1)
    e = tl.arange(0, 32 * WARPS)[None, :]
    g = (e % 32) // 4
    t = e % 4
    rows = tl.program_id(0) * (16 * R * WARPS) + (tl.arange(0, R)[:, None] * WARPS + e // 32) * 16 + g
    ok_top = rows < N
    ok_bot = rows + 8 < N
    w_top = w_ptr + rows.to(tl.int64) * KW2 + t
    w_bot = w_top + 8 * KW2
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)
    if PREFETCH > 0:
        prog_rows = tl.program_id(0) * (16 * R * WARPS) + tl.arange(0, 16 * R * WARPS)
        prefetch_weights(w_ptr, a_ptr, mu_ptr, prog_rows, prog_rows < N, b_lo, b_hi, KW2, NB, 4, PREFETCH)
    if PDL:  # x is being quantized until here
        tl.extra.cuda.gdc_wait()
    zero = tl.zeros((R, 32 * WARPS), tl.float32)
    y0, y1, y2, y3 = zero, zero, zero, zero
    v0, v1, v2, v3 = zero, zero, zero, zero
    if ALIGNED:
        a_top = rows[:, :, None] * NB + tl.arange(0, NBT)[None, None, :]
        a_bot = a_top + 8 * NB
    for b0 in range(b_lo, b_hi, NBT):
        if ALIGNED:  # the NBT blocks' alpha and mu in one vector load per lane (module doc)
            # what the launcher guarantees (b0, b_hi and NB multiples of NBT), for the vectorizer
            blk_ok = tl.max_constancy(b0 + tl.arange(0, NBT) < b_hi, [NBT])[None, None, :]
            at3, mt3 = _block_scales(a_ptr, mu_ptr, tl.multiple_of(a_top + b0, [1, 1, NBT]),
                                     ok_top[:, :, None] & blk_ok, cache)
            ab3, mb3 = _block_scales(a_ptr, mu_ptr, tl.multiple_of(a_bot + b0, [1, 1, NBT]),
                                     ok_bot[:, :, None] & blk_ok, cache)
        for u in tl.static_range(NBT):
            b = b0 + u
            b_ok = b < b_hi
            wt = tl.load(w_top + 4 * b, mask=ok_top & b_ok, other=0, cache_modifier=cache)
            wb = tl.load(w_bot + 4 * b, mask=ok_bot & b_ok, other=0, cache_modifier=cache)
            if ALIGNED:
                at, mt, ab, mb = pick(at3, u), pick(mt3, u), pick(ab3, u), pick(mb3, u)
            else:
                at, mt = _block_scales(a_ptr, mu_ptr, rows * NB + b, ok_top & b_ok, cache)
                ab, mb = _block_scales(a_ptr, mu_ptr, (rows + 8) * NB + b, ok_bot & b_ok, cache)
            y0, y1, y2, y3 = _block_update(y0, y1, y2, y3, wt, wb, xf_ptr, xstat_ptr, 0, b,
                                           b_ok, NB, t, at, mt, ab, mb, USE_ASM, R, WARPS, TILES)
            if TILES == 2:
                v0, v1, v2, v3 = _block_update(v0, v1, v2, v3, wt, wb, xf_ptr, xstat_ptr, 1, b,
                                               b_ok, NB, t, at, mt, ab, mb, USE_ASM, R, WARPS, TILES)
    _store_tile(out_ptr, bias_ptr, y0, y1, y2, y3, 0, t, rows, M, N, pid_k, HAS_BIAS, SPLIT_OUT)
    if TILES == 2:
        _store_tile(out_ptr, bias_ptr, v0, v1, v2, v3, 1, t, rows, M, N, pid_k, HAS_BIAS, SPLIT_OUT)


# (R row tiles per warp, warps, blocks per iteration). H200 sweep of session 9 (sweep_gemv_imma.py,
# 9 configs with R = 1-2, NBT = 1-4): (1, 4, 4) was the best at M <= 8 on every shape, (1, 2, 2) /
# (1, 4, 2) at M = 16 (two x tiles: 178 registers with NBT = 4); R = 2 never in the top three.
# (1, 8, 4), (1, 2, 4) and (1, 4, 8) (more words in flight per SM) were added untimed.
IMMA_SHAPES = [(1, 4, 4), (1, 2, 2), (1, 4, 2), (1, 8, 2), (1, 8, 4), (1, 2, 4), (1, 4, 8)]
# Each also with the L2 prefetch of its program's first 256 K blocks (common.LATENCY): the kernel
# now waits on memory latency rather than L1 throughput (Nsight Compute, session 21: L1 48 % busy,
# long-scoreboard stalls, 21 % occupancy at M = 16 on 28672x8192), and with fixed configs the
# prefetch took 8-12 % off M = 16 on three shapes and added 7 % on another (H100, session 21).
IMMA_PREFETCH = (0, 256)
_IMMA = autotune([triton.Config({"R": r, "WARPS": w, "NBT": nbt, "PREFETCH": pf}, num_warps=w, num_stages=1)
                  for r, w, nbt in IMMA_SHAPES for pf in IMMA_PREFETCH],
                 ["m_bucket", "N", "KW2", "blocks_per_split"])(ternary_gemv_imma_kernel)
# The config without autotuning, per number of 8-row x tiles. H100, session 20 (every config fixed,
# 28672x8192): one tile (1, 4, 4) 56.2 us at M = 4 (the best on 4096x4096 and 4096x11008; (1, 8, 4)
# 49.8 on this shape only), two tiles (1, 4, 2) 75.4 us at M = 16 against 94.3 for (1, 4, 4)
# (4096x4096: 13.5 vs 13.9).
_FIXED = ({tiles: {"R": 1, "WARPS": 1, "NBT": 2, "num_warps": 1} for tiles in (1, 2)} if INTERPRET else
          {1: {"R": 1, "WARPS": 4, "NBT": 4, "num_warps": 4}, 2: {"R": 1, "WARPS": 4, "NBT": 2, "num_warps": 4}})
# the launcher turns the scale vectors on for every autotuned or fixed launch: each NBT must divide them
assert all(SCALE_VECTOR % nbt == 0 for nbt in [c[2] for c in IMMA_SHAPES] + [f["NBT"] for f in _FIXED.values()])


def program_rows(cfg: dict) -> int:
    return 16 * cfg["R"] * cfg["WARPS"]


def imma_split(n: int, nb: int, sms: int) -> int:
    """K splits for ~2 programs per SM, assuming 64 rows per program (the fixed config's)."""
    return gemv_split(1, n, nb, sms, rows_per_program=64, min_blocks=2)


def ternary_gemv_imma(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                      bias, perm, out: torch.Tensor, split: int = 1, config=None) -> torch.Tensor:
    """y = x[:, perm] @ W^T + bias into ``out`` (M, N), x bf16/fp16 (M <= 16, K). ``config``: a
    fixed {"R", "WARPS", "NBT", "num_warps"[, "STREAM_CG", "PREFETCH"]} (experiments, tests), else
    autotuned / the default."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"ternary_gemv_imma takes bf16/fp16 activations, got {x.dtype}")
    if not 1 <= x.shape[0] <= MAX_M:
        raise ValueError(f"ternary_gemv_imma takes 1..{MAX_M} rows of x, got {x.shape[0]}")
    if packed.storage_offset() % 2:
        raise ValueError("ternary_gemv_imma reads the packed words in 8-byte pairs: the packed "
                         "tensor's storage offset must be even")
    # block counts multiples of 8 (every listed NBT divides it): each program's scale vectors are aligned
    aligned = (x.shape[1] // 128) % SCALE_VECTOR == 0
    aligned &= config is None or SCALE_VECTOR % config["NBT"] == 0
    args, split, target = launch_args("ternary_gemv_imma", x, packed, alpha, mu, bias, perm, out, split,
                                      block_multiple=SCALE_VECTOR if aligned else 1)
    _, _, _, _, bias_arg, _, target, m, n, kw, nb, _, bps, _, bucket = args
    latency = latency_meta(x)
    xf, xstat = quantize_x_imma(x, perm, pdl=latency["PDL"])
    args = (xf, xstat, packed.view(torch.int64), alpha, mu, bias_arg, target, m, n, kw // 2, nb,
            bps, bucket)
    # the autotuned configs carry their own PREFETCH; a fixed or given one takes LATENCY's
    prefetch = latency.pop("PREFETCH")
    config = {"PREFETCH": prefetch, **config} if config is not None else None
    stream_cg = config.pop("STREAM_CG", False) if config is not None else False
    meta = dict(HAS_BIAS=bias is not None, SPLIT_OUT=split > 1, USE_ASM=not INTERPRET, ALIGNED=aligned,
                TILES=xf.shape[0], STREAM_CG=stream_cg, **latency)
    launch_tuned(_IMMA, lambda rows: (triton.cdiv(n, rows), split), dict(_FIXED[xf.shape[0]], PREFETCH=prefetch),
                 config, *args, program_rows=program_rows, **meta)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out
