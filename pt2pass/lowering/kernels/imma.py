"""Integer tensor-core arithmetic for 1-16 rows of x: 2-bit codes times int16 x by ``mma.sync`` int8.

The dp2a GEMV (dp2a.py) spends ~15 instructions per 32-bit word for each row of x, so its time
grows with M; the fused GEMM (gemm.py) unpacks codes to bf16 tiles that go through shared memory
before ``tl.dot``. Here the unpacked codes never leave the registers (as in Marlin): a warp's
``mma.sync.m16n8k32`` takes A = 16 rows of W x 32 columns as u8 codes q = T + 1 in {0, 1, 2},
and ``(w >> 2r) & 0x03030303`` of a packed word *is* an A register (four codes, one per byte),
so one word gives four A registers for two instructions. B = 32 columns x 8 rows of x as int8:
x is quantized to int16 per 128-block as in dp2a.py (x_int = round(x / s_b), |x_int| <= 32767)
and split into a signed high byte and an unsigned low byte, x_int = 256 x_hi + x_lo, so per
block P = sum q x_int = 256 (A . B_hi) + (A . B_lo): exact int32 sums, the same integers as the
dp2a GEMV. Then per (W row n, x row m, block b): y += alpha_nb s_mb (P - X_mb) + mu_nb sum(x_mb).

Fragments (PTX ISA, mma.m16n8k32 with 8-bit A/B; lane = 4 g + t): A register 0 holds row g,
columns 4t .. 4t+3; register 1 row g + 8, same columns; registers 2, 3 the same rows at columns
16 + 4t ..; B register 0 holds x row g at columns 4t .. 4t+3, register 1 at 16 + 4t ..; the
accumulator holds (row g, x rows 2t, 2t + 1) and (row g + 8, same). Byte i of a register is
column + i. The order of the 32 columns inside one instruction is free as long as A and B agree:
lane (g, t) loads the words 2t and 2t + 1 of its two rows (one 64-bit load each) and step s of
the block's four uses word 2t + s // 2 at shifts r = 2 (s % 2) (registers 0, 1) and r + 1
(registers 2, 3); byte i of ``(w >> 2r) & 0x03030303`` is slot r + 4i, column 128 b + 8 (r + 4i)
+ j of the block-planar format (format.py). :func:`quantize_fragments` writes x's bytes in exactly
that order, as int32 words per (block, step, lane, byte half, register): a lane's four B registers
of one step are 16 adjacent bytes, one vector load (a warp's load covers 512 adjacent bytes), and
the x statistics of a block and x row are one 16-byte record, so per block and 8-row tile of x a
lane issues 4 + 2 loads instead of 16 + 6 (session 20).

Under TRITON_INTERPRET=1 (no PTX) :func:`emulated_mma` computes the instruction from the same
registers by its definition, across the lanes of each warp: the tests check the fragment layout
with it, the GPU check (benchmarks/experiments/sweep_gemv_imma.py) the real instruction.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .common import x_column_stats
from .dp2a import to_int, x_block_scales

CODE_BYTES = tl.constexpr(0x03030303)
_MMA = "mma.sync.aligned.m16n8k32.row.col.s32.u8.{}.s32 {{$0,$1,$2,$3}}, {{$4,$5,$6,$7}}, {{$8,$9}}, {{$10,$11,$12,$13}};"
MMA_S8 = tl.constexpr(_MMA.format("s8"))  # B = x_hi, signed
MMA_U8 = tl.constexpr(_MMA.format("u8"))  # B = x_lo, unsigned
_MMA_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r")
# int32 of x fragments per (8-row tile, block): 4 steps x 32 lanes x 2 byte halves x 2 registers
FRAGMENT_WORDS = tl.constexpr(512)
# floats per (block, x row): s_b, X_b (a float: integers below 2^24 are exact), sum(x), 0
STAT_WORDS = tl.constexpr(4)


@triton.jit
def pick(v, u: tl.constexpr):
    """v[:, :, u] of an (R, L, V) float32 / int32 tensor whose V values sit in one thread: an integer
    sum whose other terms are 0, which the compiler folds away, so no data moves between threads
    (a float sum kept one FADD per pick: +0.0 is not an exact identity)."""
    sel = tl.arange(0, v.shape[2])[None, None, :] == u
    if v.dtype.is_floating():
        out = tl.sum(tl.where(sel, v.to(tl.int32, bitcast=True), 0), axis=2).to(tl.float32, bitcast=True)
    else:
        out = tl.sum(tl.where(sel, v, 0), axis=2)
    return out


@triton.jit
def _bytes(v, SIGNED: tl.constexpr):
    """(R, L) int32 -> (R, L, 4): its four bytes, low first, sign-extended if SIGNED."""
    b = v[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]
    if SIGNED:
        b = (b << 24) >> 24
    else:
        b = b & 0xFF
    return b


@triton.jit
def _lane_matrix(v, SIGNED: tl.constexpr, R: tl.constexpr, WARPS: tl.constexpr):
    """Registers (R, 32 WARPS) of every lane (g, t) as (R WARPS, 8 g, 16 k), k = 4 t + byte."""
    return tl.reshape(_bytes(v, SIGNED), (R * WARPS, 8, 16))


@triton.jit
def _rows_times_x(a_lo, a_hi, b_lo, b_hi):
    """(warps, 8, 8): sum over k of A[g, k] B[n, k], the 16 k of register 0 and the 16 of 2."""
    return (tl.sum(a_lo[:, :, None, :] * b_lo[:, None, :, :], axis=3)
            + tl.sum(a_hi[:, :, None, :] * b_hi[:, None, :, :], axis=3))


@triton.jit
def emulated_mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, B_SIGNED: tl.constexpr, R: tl.constexpr,
                 WARPS: tl.constexpr):
    """mma.m16n8k32 (u8 A, s8 / u8 B, s32) of every warp, from the per-lane registers ((R, 32 WARPS)
    tensors, element (r, 32 w + lane)) by the PTX fragment definitions."""
    d_top = _rows_times_x(_lane_matrix(a0, False, R, WARPS), _lane_matrix(a2, False, R, WARPS),
                          _lane_matrix(b0, B_SIGNED, R, WARPS), _lane_matrix(b1, B_SIGNED, R, WARPS))
    d_bot = _rows_times_x(_lane_matrix(a1, False, R, WARPS), _lane_matrix(a3, False, R, WARPS),
                          _lane_matrix(b0, B_SIGNED, R, WARPS), _lane_matrix(b1, B_SIGNED, R, WARPS))
    # lane (g, t) gets D[g, 2t], D[g, 2t + 1] (top rows) and the same of the bottom rows
    e0, e1 = tl.split(tl.reshape(d_top, (R * WARPS, 8, 4, 2)))
    e2, e3 = tl.split(tl.reshape(d_bot, (R * WARPS, 8, 4, 2)))
    shape: tl.constexpr = (R, 32 * WARPS)
    return (c0 + tl.reshape(e0, shape), c1 + tl.reshape(e1, shape), c2 + tl.reshape(e2, shape),
            c3 + tl.reshape(e3, shape))


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, B_SIGNED: tl.constexpr, USE_ASM: tl.constexpr,
         R: tl.constexpr, WARPS: tl.constexpr):
    if USE_ASM:
        d = tl.inline_asm_elementwise(MMA_S8 if B_SIGNED else MMA_U8, _MMA_CONSTRAINTS,
                                      [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                                      dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        d = emulated_mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, B_SIGNED, R, WARPS)
    return d


@triton.jit
def block_products(w_top, w_bot, xf_ptr, xf_lane, USE_ASM: tl.constexpr, R: tl.constexpr, WARPS: tl.constexpr):
    """Per lane, P = sum over one 128-block of q * x_int for (row g, x rows 2t, 2t + 1) and (row
    g + 8, the same): four int32 (R, 32 WARPS). ``w_top`` / ``w_bot``: the lane's int64 of words
    2t, 2t + 1 of its rows g / g + 8; ``xf_ptr + xf_lane``: the block's x fragments at the lane
    (``xf_lane`` (1, 32 WARPS) int offsets, multiples of 4: 4 words per lane and step)."""
    shape: tl.constexpr = (R, 32 * WARPS)
    top = (w_top.to(tl.int32), (w_top >> 32).to(tl.int32))
    bot = (w_bot.to(tl.int32), (w_bot >> 32).to(tl.int32))
    # per step s, one 16-byte load per lane: the B registers (high byte 0, 1, low byte 0, 1); the
    # alignment is stated on the integer offsets (on the pointers it would count bytes)
    xq = xf_ptr + tl.multiple_of(xf_lane[:, :, None] + tl.arange(0, 4)[None, None, :], [1, 1, 4])
    xv = (tl.load(xq), tl.load(xq + 128), tl.load(xq + 256), tl.load(xq + 384))
    c0 = tl.zeros(shape, tl.int32)
    c1 = tl.zeros(shape, tl.int32)
    c2 = tl.zeros(shape, tl.int32)
    c3 = tl.zeros(shape, tl.int32)
    for half in tl.static_range(2):  # x_hi (signed) first, then x_lo added to 256 times its sum
        if half == 1:
            c0, c1, c2, c3 = c0 << 8, c1 << 8, c2 << 8, c3 << 8
        for s in tl.static_range(4):
            wt = top[s // 2]
            wb = bot[s // 2]
            b0 = tl.broadcast_to(pick(xv[s], 2 * half), shape)
            b1 = tl.broadcast_to(pick(xv[s], 2 * half + 1), shape)
            # shifts 2r and 2r + 2 with r = 2 (s % 2)
            c0, c1, c2, c3 = _mma((wt >> 4 * (s % 2)) & CODE_BYTES, (wb >> 4 * (s % 2)) & CODE_BYTES,
                                  (wt >> 4 * (s % 2) + 2) & CODE_BYTES, (wb >> 4 * (s % 2) + 2) & CODE_BYTES,
                                  b0, b1, c0, c1, c2, c3, half == 0, USE_ASM, R, WARPS)
    return c0, c1, c2, c3


@triton.jit
def quantize_fragments(x_row, perm_ptr, xf_lane, xstat_row, NB, STAT_STRIDE, row_ok,
                       HAS_PERM: tl.constexpr, NBT: tl.constexpr):
    """One x row (gathered through ``perm_ptr``; zeros where not ``row_ok``), this program's NBT
    blocks: dp2a.py's s_b, X_b = sum x_int, sum(x) as block b's record at ``xstat_row + b *
    STAT_STRIDE`` (STAT_WORDS floats), and the B fragment words at ``xf_lane`` (the row's tile,
    offset by its lane base 4 g words x 4): word s * 128 + 4 t + 2 h + reg of a lane's block holds
    the bytes h (0: high, signed; 1: low) of x_int at the columns of step s, register reg, lane t."""
    blk = tl.program_id(0) * NBT + tl.arange(0, NBT)
    bok = (blk < NB) & row_ok
    ij = tl.arange(0, 8)
    big, total = x_column_stats(x_row, perm_ptr, blk, bok[:, None] & (ij < 8)[None, :], HAS_PERM, NBT)
    scale, inv, xsum = x_block_scales(big, total)
    f = tl.arange(0, 128)  # ((s * 2 + reg) * 4 + t) * 4 + byte
    byte = f % 4
    s = f // 32
    r = 2 * (s % 2) + (f // 16) % 2
    j = 2 * ((f // 4) % 4) + s // 2
    ok = bok[:, None] & (f < 128)[None, :]
    ks = blk[:, None] * 128 + (8 * (r + 4 * byte) + j)[None, :]
    if HAS_PERM:
        ks = tl.load(perm_ptr + ks, mask=ok, other=0)
    xi = to_int(tl.load(x_row + ks, mask=ok, other=0.0).to(tl.float32), inv[:, None])
    shift = (8 * byte)[None, :]
    # bytes into words: disjoint bit fields, so the sum is their OR
    hi = tl.sum(tl.reshape(((xi >> 8) & 0xFF) << shift, (NBT, 32, 4)), axis=2)
    lo = tl.sum(tl.reshape((xi & 0xFF) << shift, (NBT, 32, 4)), axis=2)
    c = tl.arange(0, 32)  # (s * 2 + reg) * 4 + t
    dst = blk[:, None] * FRAGMENT_WORDS + ((c // 8) * 128 + (c % 4) * 4 + (c // 4) % 2)[None, :]
    wok = (blk < NB)[:, None] & (c < 32)[None, :]
    tl.store(xf_lane + dst, hi, mask=wok)
    tl.store(xf_lane + dst + 2, lo, mask=wok)
    q = tl.arange(0, STAT_WORDS)[None, :]
    xint = tl.sum(xi, axis=1).to(tl.float32)  # |X_b| <= 128 * 32767 < 2^24: exact
    record = tl.where(q == 0, scale[:, None], tl.where(q == 1, xint[:, None], tl.where(q == 2, xsum[:, None], 0.0)))
    tl.store(xstat_row + blk[:, None] * STAT_STRIDE + q, record, mask=(blk < NB)[:, None] & (q < STAT_WORDS))
