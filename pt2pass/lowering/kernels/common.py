"""Pieces shared by the ternary kernels: interpreter detection, autotune wrapping, split-K reduce.

Autotuning: kernels are wrapped with ``triton.autotune`` keyed on (M bucket, N, K, split), and with
``cache_results=True`` when the installed Triton has it (3.3+): the timings then go to Triton's own
on-disk cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``, keyed by Triton version, GPU
target, kernel source and configs), so a second process picks the best config without re-tuning.
Under ``TRITON_INTERPRET=1`` (the CPU tests) no autotuning happens: one small fixed config runs;
``PT2PASS_AUTOTUNE=0`` does the same on a GPU with a good default config.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode

# The interpreter runs tl.dot on bf16/fp16 through numpy and gives garbage: upcast there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# PT2PASS_AUTOTUNE=0 launches one fixed config per path (quick checks: no tuning, fewer compiles).
AUTOTUNE = not INTERPRET and os.environ.get("PT2PASS_AUTOTUNE", "1") != "0"
# float32 1.0: OR-ed onto an extracted code it gives 1 + q * 2**(p - 23) with no int->float convert.
# Passed as a runtime argument so that ptxas fuses the AND and the OR into one LOP3.
ONE_BITS = 0x3F800000
BLOCK = 128  # weights per scale block and per block-planar group (see format.py)


def m_bucket(m: int) -> int:
    """Autotune key for the batch size: the next power of two (1, 2, 4, ..., 4096)."""
    return 1 << max(0, min(int(m), 4096) - 1).bit_length()


def autotune(configs, key):
    """triton.autotune with the on-disk cache when available; a plain jit kernel in the interpreter."""
    def wrap(fn):
        if not AUTOTUNE:
            return fn
        kwargs = {}
        if "cache_results" in inspect.signature(triton.autotune).parameters:
            kwargs["cache_results"] = True
        return triton.autotune(configs=configs, key=key, **kwargs)(fn)
    return wrap


def launch(kernel, grid, *args, **kwargs):
    """Launch through torch.library.wrap_triton so torch.compile / export see (and inline) it."""
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def gemv_configs(shapes):
    """Autotune configs from (BN rows per program, NBT blocks per iteration, warps)."""
    return [triton.Config({"BN": bn, "NBT": nbt}, num_warps=w, num_stages=1) for bn, nbt, w in shapes]


def _bn(cfg: dict) -> int:
    return cfg["BN"]


def launch_tuned(kernel, grid, fixed: dict, config, *args, program_rows=_bn, **meta):
    """Launch an autotuned GEMV: the autotuner's pick, or one fixed config (``config`` from an
    experiment, else ``fixed``) when given or when autotuning is off. ``grid(rows)`` is the launch
    grid for ``program_rows(config)`` output rows per program (default: the config's BN)."""
    if config is not None or not AUTOTUNE:
        cfg = dict(config or fixed)
        launch(kernel.fn if AUTOTUNE else kernel, grid(program_rows(cfg)), *args, **meta, **cfg)
    else:
        launch(kernel, lambda META: grid(program_rows(META)), *args, **meta)


# Latency hiding in the small-M GEMVs (read by their launchers on every call; experiments set them
# in place, benchmarks/experiments/sweep_latency.py):
# - "prefetch_blocks": before it waits for anything, a GEMV program asks L2 for the words and
#   scales of its first this-many K blocks (PTX prefetch.global.L2: no registers, no data back), so
#   its whole range is in flight at once rather than one iteration's loads at a time. At N ~ 4096
#   the programs fit in about half a wave and each runs only a few iterations (Nsight Compute,
#   session 18): their time is mostly load latency.
# - "pdl": the GEMV is launched as a programmatic dependent of its own x quantize launch (eager
#   calls on CUDA; torch.compile's launcher has no such launch for user kernels): its programs
#   start, and prefetch, while x is being quantized, and wait for it (griddepcontrol.wait) before
#   they read x or write anything (but a TMA config's tensor descriptor in its own scratch, which
#   no running kernel can hold: the quantizer is a plain launch, so everything before it has
#   finished, and its buffers stay allocated until the GEMV is launched). Hopper and newer.
# Measured (H100, session 21, fixed configs, sweep_latency.py): the dependent launch took 2-3 % off
# the geometric mean at M = 1 and 4 (up to 7 % per shape), bit-equal results: on. The prefetch
# helped some (shape, M) and slowed others (3 % slower overall at M = 1): off here, and an autotune choice
# of the integer-MMA GEMV (gemv_imma.IMMA_PREFETCH).
LATENCY = {"prefetch_blocks": 0, "pdl": True}


def pdl_launch(x: torch.Tensor) -> bool:
    """Whether this call's GEMV goes out as a programmatic dependent launch (LATENCY): a plain eager
    call on CUDA, not one being traced (torch.compile / export trace the launch into a graph, whose
    launcher does not take the option)."""
    return (LATENCY["pdl"] and x.is_cuda and not INTERPRET and type(x) is torch.Tensor
            and _get_current_dispatch_mode() is None and not torch.compiler.is_compiling()
            and hopper_or_newer(x.device))  # griddepcontrol is sm_90 PTX (ptxas rejects it below)


def prefetch_blocks() -> int:
    """LATENCY's prefetch as the kernels' PREFETCH constexpr (0 in the interpreter: no inline PTX)."""
    return 0 if INTERPRET else LATENCY["prefetch_blocks"]


def latency_meta(x: torch.Tensor) -> dict:
    """The GEMV kernels' PREFETCH / PDL constexprs for this call, and Triton's launch_pdl option
    when PDL is on (only then: a traced launch takes no such option)."""
    pdl = pdl_launch(x)
    meta = dict(PREFETCH=prefetch_blocks(), PDL=pdl)
    return dict(meta, launch_pdl=True) if pdl else meta


@triton.jit
def prefetch_l2(ptrs, mask):
    """Ask L2 for the cache lines holding ``ptrs`` where ``mask`` (PTX prefetch.global.L2: no
    register waits for it, nothing comes back)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                              "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_rows(row_ptrs, row_ok, lo, hi, LINES: tl.constexpr):
    """prefetch_l2 of elements [lo, hi) of each row (``row_ptrs`` (BR,)), which span at most LINES
    128-byte lines: one address per line from lo on while in the range, and the last element (lo
    may sit mid-line)."""
    per_line: tl.constexpr = 1024 // row_ptrs.dtype.element_ty.primitive_bitwidth
    last = hi - 1
    j = lo + per_line * tl.arange(0, LINES)
    ok = row_ok & (lo <= last)
    prefetch_l2(row_ptrs[:, None] + j[None, :], ok[:, None] & (j <= last)[None, :])
    prefetch_l2(row_ptrs + last, ok)


@triton.jit
def prefetch_weights(w_ptr, a_ptr, mu_ptr, rows, row_ok, b_lo, b_hi, W_ROW, NB,
                     WORDS_PER_BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    """LATENCY's prefetch: the packed words (W_ROW elements of w_ptr's type per row,
    WORDS_PER_BLOCK per 128-block) and alpha / mu of K blocks [b_lo, min(b_hi, b_lo + BLOCKS)) of
    ``rows`` (BR,). BLOCKS: a power of two >= 8."""
    hi = tl.minimum(b_hi, b_lo + BLOCKS)
    r64 = rows.to(tl.int64)
    word_bits: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth
    word_lines: tl.constexpr = BLOCKS * WORDS_PER_BLOCK * word_bits // 1024
    _prefetch_rows(w_ptr + r64 * W_ROW, row_ok, b_lo * WORDS_PER_BLOCK, hi * WORDS_PER_BLOCK, word_lines)
    scale_bits: tl.constexpr = a_ptr.dtype.element_ty.primitive_bitwidth
    scale_lines: tl.constexpr = (BLOCKS * scale_bits + 1023) // 1024
    _prefetch_rows(a_ptr + r64 * NB, row_ok, b_lo, hi, scale_lines)
    _prefetch_rows(mu_ptr + r64 * NB, row_ok, b_lo, hi, scale_lines)


# Blocks per prepack program and its warps (a dict: experiments update it in place). Many small
# programs: the SSR gather is latency bound, and 8 blocks x 2 warps (4 programs at K = 4096) took
# 4.8-5.2 us with a permutation against 2.0-2.4 us here (sweep_prepack.py, H200; 1.6 us without).
PREPACK = {"NBT": 2, "num_warps": 1}


@triton.jit
def load_pairs(xp_rows, col, ok, KW):
    """The eight x pair planes (half2 or int16 pairs, plane stride KW) at the word columns ``col``
    (any leading shape of ``xp_rows``)."""
    return (tl.load(xp_rows + col, mask=ok, other=0), tl.load(xp_rows + KW + col, mask=ok, other=0),
            tl.load(xp_rows + 2 * KW + col, mask=ok, other=0), tl.load(xp_rows + 3 * KW + col, mask=ok, other=0),
            tl.load(xp_rows + 4 * KW + col, mask=ok, other=0), tl.load(xp_rows + 5 * KW + col, mask=ok, other=0),
            tl.load(xp_rows + 6 * KW + col, mask=ok, other=0), tl.load(xp_rows + 7 * KW + col, mask=ok, other=0))


@triton.jit
def x_column_stats(x_row, perm_ptr, blk, ok, HAS_PERM: tl.constexpr, NBT: tl.constexpr):
    """For the blocks ``blk`` of one x row (gathered through ``perm_ptr``): per (block, word
    column j) the largest |x| and the sum of x over its 16 columns 128 b + 8 s + j, float32."""
    ij = tl.arange(0, 8)
    big = tl.zeros((NBT, 8), tl.float32)
    total = tl.zeros((NBT, 8), tl.float32)
    for s in tl.static_range(16):
        ks = blk[:, None] * 128 + 8 * s + ij[None, :]
        if HAS_PERM:
            ks = tl.load(perm_ptr + ks, mask=ok, other=0)
        v = tl.load(x_row + ks, mask=ok, other=0.0).to(tl.float32)
        big = tl.maximum(big, tl.abs(v))
        total += v
    return big, total


def dot_in_fp32(x: torch.Tensor) -> bool:
    return INTERPRET or x.dtype == torch.float32


@triton.jit
def load_weight_tile(w_rows, a_ptr, mu_ptr, rows, row_ok, blk, blk_ok, NB):
    """A GEMV tile: words (BN, NBT, 8) of the rows at ``w_rows`` (pointers, (BN, 1, 1)) and blocks
    ``blk``, alpha and mu (BN, NBT) as float32; masked entries read 0."""
    ij = tl.arange(0, 8)
    words = tl.load(w_rows + (blk * 8)[None, :, None] + ij[None, None, :],
                    mask=row_ok[:, None, None] & blk_ok[None, :, None], other=0)
    al, mu = load_block_scales(a_ptr, mu_ptr, rows, row_ok, blk, blk_ok, NB)
    return words, al, mu


@triton.jit
def load_block_scales(a_ptr, mu_ptr, rows, row_ok, blk, blk_ok, NB):
    """alpha and mu (BN, NBT) of ``rows`` and blocks ``blk`` as float32; masked entries read 0."""
    sofs = rows[:, None] * NB + blk[None, :]
    smask = row_ok[:, None] & blk_ok[None, :]
    al = tl.load(a_ptr + sofs, mask=smask, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + sofs, mask=smask, other=0.0).to(tl.float32)
    return al, mu


def tma_supported(*weights: torch.Tensor) -> bool:
    """Whether the GEMVs may read these packed weights with TMA (device-side tensor descriptors):
    not switched off by ``PT2PASS_TMA=0``, Hopper or newer (the interpreter emulates it), contiguous
    (as the GEMVs assume) with a 16-byte aligned base. Rows are K/16 int32 words, K % 128 == 0, so
    they are 16-byte aligned too."""
    if os.environ.get("PT2PASS_TMA", "1") == "0":  # opt-out: plain loads only
        return False
    if any(not w.is_contiguous() or w.storage_offset() % 4 for w in weights):
        return False
    device = weights[0].device
    if device.type != "cuda":
        return INTERPRET
    return hopper_or_newer(device)


def hopper_or_newer(device: torch.device) -> bool:
    """Whether this CUDA device is an NVIDIA GPU of compute capability 9 or newer (TMA, griddepcontrol)."""
    return _sm90(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm90(device_index: int) -> bool:
    # cached: asked on every GEMV call, and the eager decode path is host bound; ROCm reports its
    # gfx versions as capabilities (MI300: 9.4), and the kernels' inline PTX is NVIDIA's
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Device-side tensor descriptors need global scratch memory (128 B per program), which Triton
    requests from the allocator set with ``triton.set_allocator`` and fails without one. Install a
    torch-backed allocator (caching allocator, CUDA-graph safe) unless one is already set."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


@triton.jit
def store_gemv_row(out_ptr, bias_ptr, y, rows, row_ok, m, pid_k, M, N,
                   HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr):
    """Row m of a GEMV's output: float32 into the split-K workspace (SPLIT_OUT: bias added by the
    reduce), else + bias, cast to out's dtype."""
    if SPLIT_OUT:
        tl.store(out_ptr + (pid_k * M + m) * N + rows, y, mask=row_ok)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def store_gemv_rows(out_ptr, bias_ptr, y, ms, m_ok, rows, row_ok, pid_k, M, N,
                    HAS_BIAS: tl.constexpr, SPLIT_OUT: tl.constexpr):
    """:func:`store_gemv_row` for a (BM, BN) tile: rows ``ms`` of x (``m_ok``) by W rows ``rows``."""
    ok = m_ok[:, None] & row_ok[None, :]
    if SPLIT_OUT:
        tl.store(out_ptr + (pid_k * M + ms[:, None]) * N + rows[None, :], y, mask=ok)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + ms[:, None] * N + rows[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, MN, N, SPLIT,
                          HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """out[i] = sum_s ws[s, i] (+ bias[i % N]), cast to out's dtype. ws is (SPLIT, M*N) float32."""
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    ok = offs < MN
    acc = tl.zeros((BLOCK_SIZE,), tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def splitk_reduce(ws: torch.Tensor, bias, out: torch.Tensor) -> None:
    split, m, n = ws.shape
    block = 1024
    launch(_splitk_reduce_kernel, (triton.cdiv(m * n, block),), ws, bias if bias is not None else ws,
           out, m * n, n, split, HAS_BIAS=bias is not None, BLOCK_SIZE=block)


def launch_args(name: str, x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor,
                mu: torch.Tensor, bias, perm, out: torch.Tensor, split: int, block_multiple: int = 1):
    """Shared argument checks and kernel arguments of the GEMV and GEMM launchers.

    Returns (args, split, target): ``split`` rounded so no program gets an empty K range (and,
    with ``block_multiple``, so every split's blocks start at a multiple of it), and ``target`` the
    fp32 (split, M, N) workspace when K is split (``out`` otherwise)."""
    m, k = x.shape
    n, kw = packed.shape
    nb = k // BLOCK
    if k % BLOCK or kw * 16 != k or alpha.shape != (n, nb) or x.stride(1) != 1:
        raise ValueError(f"{name} needs K % {BLOCK} == 0, 128-blocks and unit-stride x; got x "
                         f"{tuple(x.shape)}, packed {tuple(packed.shape)}, alpha {tuple(alpha.shape)}")
    bps = triton.cdiv(triton.cdiv(nb, split), block_multiple) * block_multiple
    split = triton.cdiv(nb, bps)
    target = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    args = (x, packed, alpha, mu, bias if bias is not None else alpha,
            perm if perm is not None else packed, target, m, n, kw, nb, x.stride(0), bps, ONE_BITS,
            m_bucket(m))
    return args, split, target
