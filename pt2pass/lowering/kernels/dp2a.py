"""Integer arithmetic for the bf16/fp16 GEMVs: x as int16 per 128-block, codes times x by dp2a.

half2.py turns every pair of codes into an fp16 pair (LOP3 + SUB) and multiplies in fp16: ~27
instructions per 32-bit word of 16 codes. Here x is quantized once per call (by the prepack) to
int16 with one float scale per 128-column block, and the codes stay integers: for r = 0..3,
``(w >> 2r) & 0x03030303`` puts the codes q = T + 1 of slots r, 4 + r, 8 + r, 12 + r in the four
bytes of a register, and two ``dp2a`` (16-bit x pair times two of those bytes, accumulated in
int32) consume them: 3 shifts + 4 ANDs + 8 dp2a = 15 instructions per word, exact integer sums.

Per block b and output row n, with P = sum of q * x_int over the block's 128 columns and
X = sum of x_int: sum T * x = s_b * (P - X), so
y_n = sum_b alpha_nb * s_b * (P_nb - X_b) + mu_nb * sum(x_b).

Precision: x_int = round(x / s_b), s_b = max |x_b| / 32767: the error is <= 2^-16 of the block's
largest |x| per element (bf16 x itself carries 2^-9 of each element), and everything after is exact
until the float32 epilogue. A block with NaN or Inf gets s_b = NaN, so y is NaN as in the reference;
s_b >= 2^-126, so blocks whose largest |x| is below ~4e-34 keep fewer levels (none at bf16's
subnormals).

The pairs (prepack layout): for word column c = 8 b + j of block b (word j of every row), pair
p = 2 r + h holds x_int of slots (8 h + r, 8 h + 4 + r) in its low and high 16 bits; slot s of word
j is column 128 b + 8 s + j (format.py's block-planar order). Under TRITON_INTERPRET=1 (no inline
PTX) :func:`emulated_word_dots` computes the same integers with plain int32 ops.
"""
from __future__ import annotations

import triton
import triton.language as tl


X_MAX = tl.constexpr(32767)  # x_int in [-X_MAX, X_MAX]: per word |sum| <= 16 * 2 * X_MAX, per block < 2^24
MIN_SCALE = tl.constexpr(2.0 ** -126)  # float32's smallest normal: 1 / MIN_SCALE still fits


def _word_dot_lines() -> list:
    lines = []
    for r in range(4):
        src = "$1"
        if r:
            lines.append(f"shr.u32 t, $1, {2 * r};")
            src = "t"
        lines.append(f"and.b32 b, {src}, 0x03030303;")
        acc = "0" if r == 0 else "$0"
        lines.append(f"dp2a.lo.s32.u32 $0, ${2 + 2 * r}, b, {acc};")
        lines.append(f"dp2a.hi.s32.u32 $0, ${3 + 2 * r}, b, $0;")
    return lines


# $0 (s32) = sum over the 16 codes q of word $1 of q * x_int, with the pairs p = 2r + h in $2..$9
WORD_DOT_ASM = tl.constexpr(" ".join(["{", ".reg .b32 b, t;"] + _word_dot_lines() + ["}"]))


@triton.jit
def emulated_word_dots(words, p0, p1, p2, p3, p4, p5, p6, p7):
    """WORD_DOT_ASM in plain int32 ops (the interpreter): same integers."""
    acc = tl.zeros_like(words + p0)
    acc += _pair_dot(words, p0, 0)
    acc += _pair_dot(words, p1, 8)
    acc += _pair_dot(words, p2, 1)
    acc += _pair_dot(words, p3, 9)
    acc += _pair_dot(words, p4, 2)
    acc += _pair_dot(words, p5, 10)
    acc += _pair_dot(words, p6, 3)
    acc += _pair_dot(words, p7, 11)
    return acc


@triton.jit
def _pair_dot(words, pair, s: tl.constexpr):
    """q(slot s) * x_lo + q(slot s + 4) * x_hi for the int16 pair (x_lo, x_hi)."""
    lo = (pair << 16) >> 16  # arithmetic shifts: sign-extend the low half
    hi = pair >> 16
    return ((words >> (2 * s)) & 3) * lo + ((words >> (2 * s + 8)) & 3) * hi


@triton.jit
def word_dots(words, p0, p1, p2, p3, p4, p5, p6, p7, USE_ASM: tl.constexpr):
    """Per word (and row of x): int32 sum of q * x_int over its 16 codes."""
    if USE_ASM:  # if / else, no early return: Triton would compile both
        part = tl.inline_asm_elementwise(WORD_DOT_ASM, "=r,r,r,r,r,r,r,r,r,r",
                                         [words, p0, p1, p2, p3, p4, p5, p6, p7],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        part = emulated_word_dots(words, p0, p1, p2, p3, p4, p5, p6, p7)
    return part


@triton.jit
def x_block_scales(big, total):
    """Per block, from :func:`x_column_stats`'s (blocks, 8) largest |x| and sums: the scale s_b,
    1 / s_b (0 where the block is not finite) and sum(x)."""
    xsum = tl.sum(total, axis=1)
    finite = (xsum - xsum) == 0  # False for a NaN or an Inf in the block (the sum carries it)
    bmax = tl.max(big, axis=1)
    # 1 / scale at most 2^126: blocks below X_MAX * 2^-126 (~4e-34) keep fewer levels, down to 0 at
    # bf16's subnormals, instead of an overflowing 1 / scale that would turn x_int into garbage
    scale = tl.where(finite, tl.maximum(bmax / X_MAX, MIN_SCALE), xsum - xsum)  # NaN where not finite
    inv = tl.where(finite, 1.0 / tl.where(finite, scale, 1.0), 0.0)
    return scale, inv, xsum


@triton.jit
def to_int(v, inv):
    """round(v * inv) to the nearest integer, halves away from zero (exact in the interpreter too)."""
    t = v * inv
    return tl.where(t >= 0, t + 0.5, t - 0.5).to(tl.int32)


@triton.jit
def _x_slot(x_row, perm_ptr, blk, ok, s: tl.constexpr, HAS_PERM: tl.constexpr):
    """x (float32, (blocks, 8)) at slot s of every word column j: columns 128 b + 8 s + j, gathered
    through ``perm_ptr``; masked entries read 0."""
    ks = blk[:, None] * 128 + 8 * s + tl.arange(0, 8)[None, :]
    if HAS_PERM:
        ks = tl.load(perm_ptr + ks, mask=ok, other=0)
    return tl.load(x_row + ks, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _pair(lo, hi):
    return (lo & 0xFFFF) | (hi << 16)


@triton.jit
def quantize_blocks(x_row, perm_ptr, blk, ok, HAS_PERM: tl.constexpr):
    """The quantized x of one row's blocks ``blk`` (gathered through ``perm_ptr``; ``ok`` masks
    (blocks, 8)): :func:`quantize_slots` of its 16 slots.

    Session 10 also ran this inside the GEMV loops (each program quantizing its own blocks, no
    quantize launch): bit-equal, but slower on the H200 everywhere except 4096x4096 (where the
    half2 GEMV is as fast), 0.47-0.67x for the grouped GEMVs with SSR permutations (the gathers
    sit in every iteration's dependency chain); docs/results.md has the table."""
    return quantize_slots(_x_slot(x_row, perm_ptr, blk, ok, 0, HAS_PERM), _x_slot(x_row, perm_ptr, blk, ok, 1, HAS_PERM),
                          _x_slot(x_row, perm_ptr, blk, ok, 2, HAS_PERM), _x_slot(x_row, perm_ptr, blk, ok, 3, HAS_PERM),
                          _x_slot(x_row, perm_ptr, blk, ok, 4, HAS_PERM), _x_slot(x_row, perm_ptr, blk, ok, 5, HAS_PERM),
                          _x_slot(x_row, perm_ptr, blk, ok, 6, HAS_PERM), _x_slot(x_row, perm_ptr, blk, ok, 7, HAS_PERM),
                          _x_slot(x_row, perm_ptr, blk, ok, 8, HAS_PERM), _x_slot(x_row, perm_ptr, blk, ok, 9, HAS_PERM),
                          _x_slot(x_row, perm_ptr, blk, ok, 10, HAS_PERM), _x_slot(x_row, perm_ptr, blk, ok, 11, HAS_PERM),
                          _x_slot(x_row, perm_ptr, blk, ok, 12, HAS_PERM), _x_slot(x_row, perm_ptr, blk, ok, 13, HAS_PERM),
                          _x_slot(x_row, perm_ptr, blk, ok, 14, HAS_PERM), _x_slot(x_row, perm_ptr, blk, ok, 15, HAS_PERM))


@triton.jit
def quantize_slots(v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15):
    """From x (float32, (blocks, 8)) at the 16 slots of every word column: the int16 pairs
    p0 .. p7 (blocks, 8) in the word layout of the module doc, and per block the scale s_b,
    X_b = sum x_int (int32) and sum(x). One pass: the 16 slots stay in registers between the
    block statistics and the rounding."""
    # the sum in slot order, as x_column_stats adds (the block sums then agree to the bit)
    total = (((((((v0 + v1) + v2) + v3) + v4) + v5) + v6) + v7)
    total = (((((((total + v8) + v9) + v10) + v11) + v12) + v13) + v14) + v15
    big = tl.maximum(tl.maximum(tl.maximum(tl.abs(v0), tl.abs(v1)), tl.maximum(tl.abs(v2), tl.abs(v3))),
                     tl.maximum(tl.maximum(tl.abs(v4), tl.abs(v5)), tl.maximum(tl.abs(v6), tl.abs(v7))))
    big_hi = tl.maximum(tl.maximum(tl.maximum(tl.abs(v8), tl.abs(v9)), tl.maximum(tl.abs(v10), tl.abs(v11))),
                        tl.maximum(tl.maximum(tl.abs(v12), tl.abs(v13)), tl.maximum(tl.abs(v14), tl.abs(v15))))
    big = tl.maximum(big, big_hi)
    scale, inv, xsum = x_block_scales(big, total)
    inv = inv[:, None]
    # pair p = 2 r + h: slots 8 h + r (low half) and 8 h + 4 + r (high half)
    q0, q4 = to_int(v0, inv), to_int(v4, inv)
    q8, q12 = to_int(v8, inv), to_int(v12, inv)
    q1, q5 = to_int(v1, inv), to_int(v5, inv)
    q9, q13 = to_int(v9, inv), to_int(v13, inv)
    q2, q6 = to_int(v2, inv), to_int(v6, inv)
    q10, q14 = to_int(v10, inv), to_int(v14, inv)
    q3, q7 = to_int(v3, inv), to_int(v7, inv)
    q11, q15 = to_int(v11, inv), to_int(v15, inv)
    isum = (q0 + q1 + q2 + q3 + q4 + q5 + q6 + q7) + (q8 + q9 + q10 + q11 + q12 + q13 + q14 + q15)
    return (_pair(q0, q4), _pair(q8, q12), _pair(q1, q5), _pair(q9, q13), _pair(q2, q6), _pair(q10, q14),
            _pair(q3, q7), _pair(q11, q15), scale, tl.sum(isum, axis=1), xsum)


@triton.jit
def quantize_row(x_row, perm_ptr, xp_row, xscale_row, xint_row, xs_row, KW, NB,
                 HAS_PERM: tl.constexpr, NBT: tl.constexpr):
    """For one x row (gathered through ``perm_ptr``) and this program's NBT blocks,
    :func:`quantize_blocks` stored (:func:`store_quantized`)."""
    blk = tl.program_id(0) * NBT + tl.arange(0, NBT)
    ok = (blk < NB)[:, None] & (tl.arange(0, 8) < 8)[None, :]
    p0, p1, p2, p3, p4, p5, p6, p7, scale, xint, xsum = quantize_blocks(x_row, perm_ptr, blk, ok, HAS_PERM)
    store_quantized(xp_row, xscale_row, xint_row, xs_row, blk, ok, KW, NB,
                    p0, p1, p2, p3, p4, p5, p6, p7, scale, xint, xsum)


@triton.jit
def store_quantized(xp_row, xscale_row, xint_row, xs_row, blk, ok, KW, NB,
                    p0, p1, p2, p3, p4, p5, p6, p7, scale, xint, xsum):
    """Store one row's quantized blocks ``blk``: the int16 pairs xp[p, c] (module doc), per block
    the scale s_b, X_b = sum x_int and sum(x)."""
    col = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(xp_row + col, p0, mask=ok)
    tl.store(xp_row + KW + col, p1, mask=ok)
    tl.store(xp_row + 2 * KW + col, p2, mask=ok)
    tl.store(xp_row + 3 * KW + col, p3, mask=ok)
    tl.store(xp_row + 4 * KW + col, p4, mask=ok)
    tl.store(xp_row + 5 * KW + col, p5, mask=ok)
    tl.store(xp_row + 6 * KW + col, p6, mask=ok)
    tl.store(xp_row + 7 * KW + col, p7, mask=ok)
    bok = blk < NB
    tl.store(xscale_row + blk, scale, mask=bok)
    tl.store(xint_row + blk, xint, mask=bok)
    tl.store(xs_row + blk, xsum, mask=bok)
