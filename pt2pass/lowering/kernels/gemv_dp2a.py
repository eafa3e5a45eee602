"""GEMV for one row of bf16/fp16 x with int16 x and dp2a arithmetic (dp2a.py), x quantized once per call.

Same structure as gemv_packed.py (a small prepack kernel, then BN rows of W per program, NBT
blocks per iteration, split-K for small N), with dp2a.py's integer word dots: 15 instead of ~27
instructions per word in the PTX (28 against 42 SASS instructions per word in the whole loop),
then per word one int -> float convert and one multiply-add by alpha * s.

On Hopper and newer the weight words are streamed with TMA: a device-side tensor descriptor
copies (BN, 8 NBT) word tiles into shared memory, two or three iterations ahead of the
arithmetic. The profile of the plain-load loop (session 7) showed a warp waiting for its words,
then computing, with too few bytes in flight per SM to cover the memory latency; the TMA copies
take no registers while in flight and few instructions to issue. H200, session 8
(sweep_gemv_pipelined.py, the autotuned dispatcher): 28672x8192 37.8 -> 29.0 us, 8192x28672
38.3 -> 27.9 us (82-85 % of the measured copy bandwidth). A descriptor built on the host would
save ~7 % more, but torch.compile cannot trace one inside a triton_op. cp.async pipelining of the
same loop (Triton's default for plain loads in a pipelined loop) was slower than no pipelining.
Other GPUs, and PT2PASS_TMA=0, keep the plain loads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, PREPACK, autotune, ensure_scratch_allocator, latency_meta, launch, launch_args,
                     launch_tuned, load_block_scales, load_pairs, load_weight_tile, prefetch_weights, splitk_reduce,
                     store_gemv_row, tma_supported)
from .dp2a import quantize_row, word_dots


@triton.jit
def _quantize_x_kernel(x_ptr, perm_ptr, xp_ptr, xscale_ptr, xint_ptr, xs_ptr, KW, NB, stride_xm,
                       HAS_PERM: tl.constexpr, NBT: tl.constexpr, PDL: tl.constexpr):
    """:func:`quantize_row` for x row m = program_id(1): xp (M, 8, KW) int32, the rest (M, NB).
    PDL: the GEMV behind it may launch at once (it waits for this grid before it reads x)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    m = tl.program_id(1).to(tl.int64)
    quantize_row(x_ptr + m * stride_xm, perm_ptr, xp_ptr + m * 8 * KW, xscale_ptr + m * NB,
                 xint_ptr + m * NB, xs_ptr + m * NB, KW, NB, HAS_PERM, NBT)


def quantize_buffers(rows: int, k: int, device) -> tuple:
    """Empty (xp int32 (rows, 8, K/16), scale float32, X int32, sum float32 (rows, K/128))."""
    nb = k // 128
    return (torch.empty((rows, 8, k // 16), device=device, dtype=torch.int32),
            torch.empty((rows, nb), device=device, dtype=torch.float32),
            torch.empty((rows, nb), device=device, dtype=torch.int32),
            torch.empty((rows, nb), device=device, dtype=torch.float32))


def quantize_x(x: torch.Tensor, perm, pdl: bool = False) -> tuple:
    """(xp int32 (M, 8, K/16), scale float32, X int32, sum float32 (M, K/128)) of x[:, perm].
    ``pdl``: a GEMV launched next as its programmatic dependent may start early."""
    m, k = x.shape
    kw, nb = k // 16, k // 128
    xp, xscale, xint, xs = quantize_buffers(m, k, x.device)
    launch(_quantize_x_kernel, (triton.cdiv(nb, PREPACK["NBT"]), m), x, perm if perm is not None else xp,
           xp, xscale, xint, xs, kw, nb, x.stride(0), HAS_PERM=perm is not None, PDL=pdl, **PREPACK)
    return xp, xscale, xint, xs


@triton.jit
def weight_source(w_ptr, N, KW, BN: tl.constexpr, NBT: tl.constexpr, USE_TMA: tl.constexpr):
    """What :func:`gemv_tile_dp2a` reads W's (N, KW) words through: with USE_TMA a tensor
    descriptor built here, in the kernel (128 B of global scratch per program), else the pointer."""
    if USE_TMA:
        src = tl.make_tensor_descriptor(w_ptr, shape=[N, KW], strides=[KW, 1], block_shape=[BN, 8 * NBT])
    else:
        src = w_ptr
    return src


@triton.jit
def gemv_tile_dp2a(xp_row, xscale_row, xint_row, xs_row, w, a_ptr, mu_ptr, N, row0, b_lo, b_hi,
                   KW, NB, USE_ASM: tl.constexpr, BN: tl.constexpr, NBT: tl.constexpr,
                   USE_TMA: tl.constexpr, STAGES: tl.constexpr):
    """y (BN,) float32 = the K blocks [b_lo, b_hi) of W's rows row0 .. row0 + BN - 1 (W: N rows of
    KW words) times one quantized x row.

    USE_TMA: ``w`` is a tensor descriptor of W with block (BN, 8 NBT) (:func:`weight_source`), and
    the words come as such tiles by TMA bulk copies into shared memory, STAGES - 1 iterations
    ahead (rows past N and words past KW read 0); else ``w`` is W's pointer and the words come
    through plain vector loads (STAGES 1)."""
    rows = row0 + tl.arange(0, BN)
    row_ok = rows < N
    if not USE_TMA:
        w_rows = w + rows.to(tl.int64)[:, None, None] * KW
    acc_w = tl.zeros((BN, NBT, 8), tl.float32)  # per word: alpha * s * P
    acc_b = tl.zeros((BN, NBT), tl.float32)     # per block: mu * sum(x) - alpha * s * X
    for b0 in tl.range(b_lo, b_hi, NBT, num_stages=STAGES):
        blk = b0 + tl.arange(0, NBT)
        blk_ok = blk < b_hi
        if USE_TMA:
            # words of blocks past b_hi (the next K split's) meet alpha = 0 and x = 0 below
            words = tl.reshape(w.load([row0, b0 * 8]), (BN, NBT, 8))
            al, mu = load_block_scales(a_ptr, mu_ptr, rows, row_ok, blk, blk_ok, NB)
        else:
            words, al, mu = load_weight_tile(w_rows, a_ptr, mu_ptr, rows, row_ok, blk, blk_ok, NB)
        col = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
        cok = blk_ok[:, None] & (col >= 0)
        p0, p1, p2, p3, p4, p5, p6, p7 = load_pairs(xp_row, col, cok, KW)
        scale = tl.load(xscale_row + blk, mask=blk_ok, other=0.0)
        xint = tl.load(xint_row + blk, mask=blk_ok, other=0).to(tl.float32)
        xs = tl.load(xs_row + blk, mask=blk_ok, other=0.0)
        a_s = al * scale[None, :]
        # Per word, not summed over the block's 8 words first: that sum crosses threads (shuffles
        # every iteration; 454 against 579 SASS instructions per iteration, offline sm_90 build).
        acc_w += word_dots(words, p0, p1, p2, p3, p4, p5, p6, p7, USE_ASM).to(tl.float32) * a_s[:, :, None]
        acc_b += mu * xs[None, :] - a_s * xint[None, :]
    return tl.sum(tl.sum(acc_w, axis=2) + acc_b, axis=1)


# (rows per program, blocks per iteration, warps): each the best on some shape of the H200 sweep
# (session 7, sweep_gemv_half2.py); (8, 32, 4) never was. Plain loads.
DP2A_SHAPES = [(8, 16, 2), (8, 8, 1), (16, 16, 4), (16, 8, 2), (16, 32, 4)]
# (rows, blocks, warps, pipeline stages) with TMA (Hopper+): each the best or within 2 % of it on
# some shape of the H200 sweep of session 8 (benchmarks/experiments/sweep_gemv_pipelined.py).
DP2A_TMA_SHAPES = [(16, 8, 2, 3), (32, 8, 4, 3), (16, 8, 2, 2), (16, 16, 4, 3), (16, 32, 4, 3), (8, 16, 2, 3)]
_KEY = ["m_bucket", "N", "KW", "blocks_per_split"]


def dp2a_configs(tma: bool) -> list:
    """The plain-load configs, and with ``tma`` the TMA ones too: TMA wins on the large shapes
    (28672x8192: 29 vs 38 us) and plain loads on some (4096x11008: 11.5 vs 12.2 us), so the
    autotuner picks per shape."""
    configs = [triton.Config({"BN": bn, "NBT": nbt, "STAGES": 1, "USE_TMA": False}, num_warps=w, num_stages=1)
               for bn, nbt, w in DP2A_SHAPES]
    if tma:
        configs += [triton.Config({"BN": bn, "NBT": nbt, "STAGES": st, "USE_TMA": True}, num_warps=w, num_stages=1)
                    for bn, nbt, w, st in DP2A_TMA_SHAPES]
    return configs


@triton.jit
def ternary_gemv_dp2a_kernel(xp_ptr, xscale_ptr, xint_ptr, xs_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, out_ptr,
                             M, N, KW, NB, blocks_per_split, m_bucket,
                             HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr, USE_ASM: tl.constexpr,
                             BN: tl.constexpr, NBT: tl.constexpr, USE_TMA: tl.constexpr, STAGES: tl.constexpr,
                             PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """One row of x (program_id 2) against BN rows of W. PREFETCH, PDL: common.LATENCY."""
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    row0 = tl.program_id(0) * BN
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)
    m64 = m.to(tl.int64)
    rows = row0 + tl.arange(0, BN)
    w = weight_source(w_ptr, N, KW, BN, NBT, USE_TMA)
    if PREFETCH > 0:
        prefetch_weights(w_ptr, a_ptr, mu_ptr, rows, rows < N, b_lo, b_hi, KW, NB, 8, PREFETCH)
    if PDL:  # x is being quantized until here
        tl.extra.cuda.gdc_wait()
    y = gemv_tile_dp2a(xp_ptr + m64 * 8 * KW, xscale_ptr + m64 * NB, xint_ptr + m64 * NB, xs_ptr + m64 * NB,
                       w, a_ptr, mu_ptr, N, row0, b_lo, b_hi, KW, NB, USE_ASM, BN, NBT, USE_TMA, STAGES)
    store_gemv_row(out_ptr, bias_ptr, y, rows, rows < N, m, pid_k, M, N, HAS_BIAS, SPLIT_OUT)


_DP2A = {tma: autotune(dp2a_configs(tma), _KEY)(ternary_gemv_dp2a_kernel) for tma in (False, True)}
_FIXED = {False: {"BN": 16, "NBT": 2} if INTERPRET else {"BN": 8, "NBT": 16, "num_warps": 2},
          True: {"BN": 16, "NBT": 2, "STAGES": 2} if INTERPRET else {"BN": 16, "NBT": 8, "num_warps": 2, "STAGES": 3}}


def dp2a_launch(kernels: dict, tma, config, weights) -> tuple:
    """(kernel, fixed config, config) for a dp2a GEMV launch on the packed ``weights``: with TMA
    allowed (``tma``, or by default where :func:`tma_supported`) the autotuned kernel whose configs
    may use it, else the plain-load one; the fixed / given config completed with STAGES and USE_TMA
    (a given config uses TMA when allowed)."""
    tma = tma_supported(*weights) if tma is None else tma
    if tma and weights[0].is_cuda:
        ensure_scratch_allocator()
    fixed = {"STAGES": 1, **_FIXED[tma], "USE_TMA": tma}
    if config is not None:
        config = {"STAGES": 1, **config, "USE_TMA": tma}
    return kernels[tma], fixed, config


def ternary_gemv_dp2a(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                      bias, perm, out: torch.Tensor, split: int = 1, config=None, tma=None) -> torch.Tensor:
    """y = x[:, perm] @ W^T + bias into ``out`` (M, N), x bf16/fp16 (M, K), one program row per x row.
    ``config``: a fixed {"BN", "NBT", "num_warps"[, "STAGES"]} (experiments), else autotuned / the
    default. ``tma``: allow reading W with TMA (default: where :func:`tma_supported`): the autotuner
    then also tries the TMA configs, and a fixed config uses TMA."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"ternary_gemv_dp2a takes bf16/fp16 activations, got {x.dtype}")
    args, split, target = launch_args("ternary_gemv_dp2a", x, packed, alpha, mu, bias, perm, out, split)
    _, _, _, _, bias_arg, _, target, m, n, kw, nb, _, bps, _, bucket = args
    latency = latency_meta(x)
    xq = quantize_x(x, perm, pdl=latency["PDL"])
    args = (*xq, packed, alpha, mu, bias_arg, target, m, n, kw, nb, bps, bucket)
    meta = dict(HAS_BIAS=bias is not None, SPLIT_OUT=split > 1, USE_ASM=not INTERPRET, **latency)
    kernel, fixed, config = dp2a_launch(_DP2A, tma, config, [packed])
    launch_tuned(kernel, lambda bn: (triton.cdiv(n, bn), split, m), fixed, config, *args, **meta)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out
