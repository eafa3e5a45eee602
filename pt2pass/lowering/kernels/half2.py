"""Packed half2 arithmetic shared by the bf16/fp16 GEMVs: two weights per instruction.

One 32-bit word holds 16 codes in format.py's block-planar order (code slot s at bits 2s, column
8s + j of the block for word j). It is consumed in half2 pairs (slot s in the low half, slot s + 8
in the high half, s = 0..7), in inline PTX:

* ``lop3 t = (w & (3 << 2s') * 0x10001) | 0x6400_6400``: two fp16 numbers 1024 + q * 4^s'
  (s' = s for s < 5, else s - 5 after one shift of the word by 10 bits): no int->float convert;
* ``sub.f16x2 t -= 1024 + 4^s'``: exactly T * 4^s' (T = q - 1 in {-1, 0, 1});
* ``fma.f16x2 acc += t * x'`` with x' = x * c * 4^-s' (exact power-of-two scalings), so
  acc = c * sum(T * x) over the word's 8 + 8 codes, then converted to float32 once per word.

Precision: the fp16 chain is 8 products long per lane; c = 2^(11 - e) (per word, from the largest
|x| among its 16 columns, 2^e <= max < 2^(e+1)) keeps |x'| < 2^12 and partial sums < 2^15, far
from fp16 overflow and underflow, so the error is ~2^-11 of the word's partial sum: ~5e-4
relative on y, below bf16 output rounding. NaN/Inf in x propagate.
y_n = sum_b alpha_nb * sum_j P_nbj / c_bj + mu_nb * sum_b x_b.

:data:`WORD_DOT_ASM` does decode and products of one word for one row of x; :data:`DECODE_ASM`
and :data:`DOT_ASM` split them so that a word decoded once serves several rows. Under
TRITON_INTERPRET=1 (no inline PTX) :func:`emulated_dot` runs the same arithmetic as fp16 ops.
Every PTX constant is ONE line: torch.compile copies a kernel's source (with these globals) into
a triple-quoted string of its generated code, where an escaped newline would end the literal.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAGIC = 0x6400  # fp16 1024.0: its ulp is 1, so OR-ing a code into the low mantissa bits adds it


def _decode_lines(word: str, dest) -> list:
    """PTX turning ``word`` into the eight half2 values T * 4^s' of slots (s, s + 8)."""
    lines = [f"shr.u32 v, {word}, 10;"]
    for s in range(8):
        sp = s if s < 5 else s - 5
        mask = (3 << (2 * sp)) * 0x10001
        sub = MAGIC + (1 << (2 * sp))  # fp16 bits of 1024 + 4^s' (ulp 1: the integer adds)
        src = word if s < 5 else "v"
        lines.append(f"lop3.b32 {dest(s)}, {src}, {mask:#010x}, {(MAGIC << 16) | MAGIC:#010x}, 0xea;")
        lines.append(f"mov.b32 c, {(sub << 16) | sub:#010x};")
        lines.append(f"sub.f16x2 {dest(s)}, {dest(s)}, c;")
    return lines


def _dot_lines(t, x, out: str) -> list:
    """PTX: ``out`` (f32) = sum over s of the half2 products t(s) * x(s), one fp16 chain per lane."""
    lines = [f"mul.f16x2 a, {t(0)}, {x(0)};"]
    lines += [f"fma.rn.f16x2 a, {t(s)}, {x(s)}, a;" for s in range(1, 8)]
    return lines + ["mov.b32 {l, h}, a;", "cvt.f32.f16 fl, l;", "cvt.f32.f16 fh, h;",
                    f"add.f32 {out}, fl, fh;"]


_REGS = [".reg .b32 t<8>, a, v, c;", ".reg .b16 l, h;", ".reg .f32 fl, fh;"]
# $0 (f32) = sum over the 16 codes of word $1 of T * x', with the x' pairs in $2..$9 (half2)
WORD_DOT_ASM = tl.constexpr(" ".join(
    ["{"] + _REGS + _decode_lines("$1", lambda s: f"t{s}")
    + _dot_lines(lambda s: f"t{s}", lambda s: f"${2 + s}", "$0") + ["}"]))
# $0..$7 (half2) = T * 4^s' of slots (s, s + 8) of word $8
DECODE_ASM = tl.constexpr(" ".join(["{", ".reg .b32 v, c;"] + _decode_lines("$8", lambda s: f"${s}") + ["}"]))
# $0 (f32) = sum over s of the products of t_s ($1..$8) and x'_s ($9..$16)
DOT_ASM = tl.constexpr(" ".join(
    ["{", ".reg .b32 a;", ".reg .b16 l, h;", ".reg .f32 fl, fh;"]
    + _dot_lines(lambda s: f"${1 + s}", lambda s: f"${9 + s}", "$0") + ["}"]))


@triton.jit
def word_field(m):
    """Exponent field f of c = 2^(f - 127) = 2^(11 - e) for 2^e <= m < 2^(e+1) (m = the largest
    |x| of a word's 16 columns), clamped so that c * 4^-4 and 1 / c stay normal floats."""
    e_field = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.minimum(tl.maximum(265 - e_field, 9), 253)


@triton.jit
def inverse_scale(field):
    """1 / c for the exponent field of c (exact: a power of two)."""
    return ((254 - field) << 23).to(tl.float32, bitcast=True)


@triton.jit
def pair(x_lo, x_hi, field, s: tl.constexpr, USE_ASM: tl.constexpr):
    """x' of slots s and s + 8, x * c * 4^-s' (exact: a power of two), as one int32 holding
    (fp16(lo), fp16(hi)): one cvt on the GPU, bit operations in the interpreter."""
    SP: tl.constexpr = s if s < 5 else s - 5
    c = ((field - 2 * SP) << 23).to(tl.float32, bitcast=True)
    lo = x_lo * c
    hi = x_hi * c
    if USE_ASM:
        bits = tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        lo_bits = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi_bits = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        bits = lo_bits | (hi_bits << 16)
    return bits


@triton.jit
def emulated_dot(words, xp, s: tl.constexpr, acc_lo, acc_hi):
    """One step of the PTX's fp16 chains in plain Triton ops (the interpreter has no inline PTX):
    acc_lo / acc_hi (fp16, slots s / s + 8) += (T * 4^s') * x' with x' unpacked from ``xp``.
    ``words`` and ``xp`` broadcast against each other (one word, several rows of x)."""
    SP: tl.constexpr = s if s < 5 else s - 5
    lo = (xp & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True) * (1 << (2 * SP))
    hi = ((xp >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True) * (1 << (2 * SP))
    t_lo = (((words >> (2 * s)) & 3) - 1).to(tl.float16)
    t_hi = (((words >> (2 * s + 16)) & 3) - 1).to(tl.float16)
    return acc_lo + t_lo * lo, acc_hi + t_hi * hi


@triton.jit
def emulated_word_dots(words, p0, p1, p2, p3, p4, p5, p6, p7):
    """The float32 word sums of WORD_DOT_ASM (or DECODE_ASM + DOT_ASM), emulated in fp16."""
    a_lo = tl.zeros_like(words + p0).to(tl.float16)  # the broadcast shape of word and row
    a_hi = a_lo
    a_lo, a_hi = emulated_dot(words, p0, 0, a_lo, a_hi)
    a_lo, a_hi = emulated_dot(words, p1, 1, a_lo, a_hi)
    a_lo, a_hi = emulated_dot(words, p2, 2, a_lo, a_hi)
    a_lo, a_hi = emulated_dot(words, p3, 3, a_lo, a_hi)
    a_lo, a_hi = emulated_dot(words, p4, 4, a_lo, a_hi)
    a_lo, a_hi = emulated_dot(words, p5, 5, a_lo, a_hi)
    a_lo, a_hi = emulated_dot(words, p6, 6, a_lo, a_hi)
    a_lo, a_hi = emulated_dot(words, p7, 7, a_lo, a_hi)
    return a_lo.to(tl.float32) + a_hi.to(tl.float32)


@triton.jit
def word_dots(words, p0, p1, p2, p3, p4, p5, p6, p7, USE_ASM: tl.constexpr):
    """Per word (and row of x): sum of T * x' over its 16 codes, float32 (WORD_DOT_ASM on the GPU)."""
    if USE_ASM:  # if / else, no early return: Triton would compile both
        part = tl.inline_asm_elementwise(WORD_DOT_ASM, "=f,r,r,r,r,r,r,r,r,r",
                                         [words, p0, p1, p2, p3, p4, p5, p6, p7],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        part = emulated_word_dots(words, p0, p1, p2, p3, p4, p5, p6, p7)
    return part
