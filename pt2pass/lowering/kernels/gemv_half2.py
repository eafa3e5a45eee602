"""GEMV for M = 1 with bf16/fp16 activations: two weights per instruction in packed half2 math.

The float32 GEMV (gemv.py) spends ~3 instructions per weight and is issue bound on the H100 (a
load-only variant runs 2x faster). Here one 32-bit word (16 codes, format.py's block-planar
order: code slot s at bits 2s, column 8s + j of the block for word j) is consumed in half2 pairs
(slot s in the low half, slot s + 8 in the high half, s = 0..7), in inline PTX:

* ``lop3 t = (w & (3 << 2s') * 0x10001) | 0x6400_6400``: two fp16 numbers 1024 + q * 4^s'
  (s' = s for s < 5, else s - 5 after one shift of the word by 10 bits): no int->float convert;
* ``sub.f16x2 t -= 1024 + 4^s'``: exactly T * 4^s' (T = q - 1 in {-1, 0, 1});
* ``fma.f16x2 acc += t * x'`` with x' = x * c * 4^-s' (exact power-of-two scalings), so
  acc = c * sum(T * x) over the word's 8 + 8 codes, then converted to float32 once per word.
About 1.8 instructions per weight instead of ~3. Precision: the fp16 chain is 8 products long
per lane; c = 2^(11 - e) (per word, from the largest |x| among its 16 columns, 2^e <= max < 2^(e+1))
keeps |x'| < 2^12 and partial sums < 2^15, far from fp16 overflow and underflow, so the error is
~2^-11 of the word's partial sum: ~5e-4 relative on y, below bf16 output rounding. NaN/Inf in x
propagate. y_n = sum_b alpha_nb * sum_j P_nbj / c_bj + mu_nb * sum_b x_b.

Under TRITON_INTERPRET=1 (no inline PTX) the same arithmetic runs as plain fp16 Triton ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import AUTOTUNE, INTERPRET, autotune, launch, launch_args, splitk_reduce

_MAGIC = 0x6400  # fp16 1024.0: its ulp is 1, so OR-ing a code into the low mantissa bits adds it


def _word_dot_asm() -> str:
    """PTX: $0 (f32) = sum over the 16 codes of word $1 of T * x', x' pairs in $2..$9 (half2)."""
    lines = ["{", ".reg .b32 t, a, v, c;", ".reg .b16 l, h;", ".reg .f32 fl, fh;",
             "shr.u32 v, $1, 10;"]
    for s in range(8):
        sp = s if s < 5 else s - 5
        src = "$1" if s < 5 else "v"
        mask = (3 << (2 * sp)) * 0x10001
        sub = _MAGIC + (1 << (2 * sp))  # fp16 bits of 1024 + 4^s' (ulp 1: the integer adds)
        lines.append(f"lop3.b32 t, {src}, {mask:#010x}, {(_MAGIC << 16) | _MAGIC:#010x}, 0xea;")
        lines.append(f"mov.b32 c, {(sub << 16) | sub:#010x};")
        lines.append("sub.f16x2 t, t, c;")
        lines.append(f"mul.f16x2 a, t, ${2 + s};" if s == 0 else f"fma.rn.f16x2 a, t, ${2 + s}, a;")
    lines += ["mov.b32 {l, h}, a;", "cvt.f32.f16 fl, l;", "cvt.f32.f16 fh, h;", "add.f32 $0, fl, fh;", "}"]
    # One line: torch.compile copies the kernel's source (and this constant) into a triple-quoted
    # string of its generated code, where an escaped newline would end the literal.
    return " ".join(lines)


WORD_DOT_ASM = tl.constexpr(_word_dot_asm())


@triton.jit
def _pack_half2(lo, hi):
    """Two float32 tensors -> one int32 tensor holding (fp16(lo), fp16(hi)) (one cvt)."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _emulated_step(acc_lo, acc_hi, words, x_lo, x_hi, field, s: tl.constexpr):
    """One half2 step of the PTX in plain fp16 Triton ops (the interpreter has no inline PTX):
    the fp16 sums of slots s and s + 8 += T * x * c (the PTX's T * 4^s' times x * c * 4^-s')."""
    lo, hi = _scaled(x_lo, x_hi, field, s)
    SP: tl.constexpr = s if s < 5 else s - 5
    t_lo = (((words >> (2 * s)) & 3) - 1).to(tl.float16)
    t_hi = (((words >> (2 * s + 16)) & 3) - 1).to(tl.float16)
    acc_lo += t_lo * (lo * (1 << (2 * SP))).to(tl.float16)[None, :, :]
    acc_hi += t_hi * (hi * (1 << (2 * SP))).to(tl.float16)[None, :, :]
    return acc_lo, acc_hi


@triton.jit
def _scaled(x_lo, x_hi, field, s: tl.constexpr):
    """x' of slots s and s + 8: x * c * 4^-s' (exact: a power of two, see the module doc)."""
    SP: tl.constexpr = s if s < 5 else s - 5
    c = ((field - 2 * SP) << 23).to(tl.float32, bitcast=True)
    return x_lo * c, x_hi * c


@triton.jit
def _pair(x_lo, x_hi, field, s: tl.constexpr):
    lo, hi = _scaled(x_lo, x_hi, field, s)
    return _pack_half2(lo, hi)


@triton.jit
def _load_x(x_row, perm_ptr, kk, ok, s: tl.constexpr, HAS_PERM: tl.constexpr):
    ks = kk + 8 * s
    if HAS_PERM:
        ks = tl.load(perm_ptr + ks, mask=ok, other=0)
    return tl.load(x_row + ks, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _word_field(m):
    """Exponent field f of c = 2^(f - 127) = 2^(11 - e) for 2^e <= m < 2^(e+1) (m = the largest
    |x| of a word's 16 columns), clamped so that c * 4^-4 and 1 / c stay normal floats."""
    e_field = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.minimum(tl.maximum(265 - e_field, 9), 253)


def _configs():
    # (rows per program, blocks per iteration, warps): the five best of the eight measured on the
    # H100 (docs/results.md, session 4); BN = 4 lost on every shape (x conversion per row).
    shapes = [(16, 16, 2), (16, 32, 4), (8, 32, 2), (32, 16, 4), (8, 16, 1)]
    return [triton.Config({"BN": bn, "NBT": nbt}, num_warps=w, num_stages=1) for bn, nbt, w in shapes]


@autotune(_configs(), key=["m_bucket", "N", "KW", "blocks_per_split"])
@triton.jit
def ternary_gemv_half2_kernel(x_ptr, w_ptr, a_ptr, mu_ptr, bias_ptr, perm_ptr, out_ptr,
                              M, N, KW, NB, stride_xm, blocks_per_split, one_bits, m_bucket,
                              HAS_BIAS: tl.constexpr, HAS_PERM: tl.constexpr,
                              SPLIT_OUT: tl.constexpr, USE_ASM: tl.constexpr,
                              BN: tl.constexpr, NBT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    ib = tl.arange(0, NBT)
    ij = tl.arange(0, 8)
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * KW
    acc = tl.zeros((BN, NBT), tl.float32)
    for b0 in range(b_lo, b_hi, NBT):
        blk = b0 + ib
        blk_ok = blk < b_hi
        words = tl.load(w_rows + (blk * 8)[None, :, None] + ij[None, None, :],
                        mask=row_ok[:, None, None] & blk_ok[None, :, None], other=0)
        sofs = rows[:, None] * NB + blk[None, :]
        smask = row_ok[:, None] & blk_ok[None, :]
        al = tl.load(a_ptr + sofs, mask=smask, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + sofs, mask=smask, other=0.0).to(tl.float32)
        # x of slot s, word j: column 128 b + 8 s + j, as (NBT, 8) tensors
        kk = blk[:, None] * 128 + ij[None, :]
        xok = blk_ok[:, None]
        x0 = _load_x(x_row, perm_ptr, kk, xok, 0, HAS_PERM)
        x1 = _load_x(x_row, perm_ptr, kk, xok, 1, HAS_PERM)
        x2 = _load_x(x_row, perm_ptr, kk, xok, 2, HAS_PERM)
        x3 = _load_x(x_row, perm_ptr, kk, xok, 3, HAS_PERM)
        x4 = _load_x(x_row, perm_ptr, kk, xok, 4, HAS_PERM)
        x5 = _load_x(x_row, perm_ptr, kk, xok, 5, HAS_PERM)
        x6 = _load_x(x_row, perm_ptr, kk, xok, 6, HAS_PERM)
        x7 = _load_x(x_row, perm_ptr, kk, xok, 7, HAS_PERM)
        x8 = _load_x(x_row, perm_ptr, kk, xok, 8, HAS_PERM)
        x9 = _load_x(x_row, perm_ptr, kk, xok, 9, HAS_PERM)
        x10 = _load_x(x_row, perm_ptr, kk, xok, 10, HAS_PERM)
        x11 = _load_x(x_row, perm_ptr, kk, xok, 11, HAS_PERM)
        x12 = _load_x(x_row, perm_ptr, kk, xok, 12, HAS_PERM)
        x13 = _load_x(x_row, perm_ptr, kk, xok, 13, HAS_PERM)
        x14 = _load_x(x_row, perm_ptr, kk, xok, 14, HAS_PERM)
        x15 = _load_x(x_row, perm_ptr, kk, xok, 15, HAS_PERM)
        big = tl.maximum(tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3))),
                         tl.maximum(tl.maximum(tl.abs(x4), tl.abs(x5)), tl.maximum(tl.abs(x6), tl.abs(x7))))
        big = tl.maximum(big, tl.maximum(
            tl.maximum(tl.maximum(tl.abs(x8), tl.abs(x9)), tl.maximum(tl.abs(x10), tl.abs(x11))),
            tl.maximum(tl.maximum(tl.abs(x12), tl.abs(x13)), tl.maximum(tl.abs(x14), tl.abs(x15)))))
        field = _word_field(big)
        inv = ((254 - field) << 23).to(tl.float32, bitcast=True)  # 1 / c
        xsum = (((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))) + \
               (((x8 + x9) + (x10 + x11)) + ((x12 + x13) + (x14 + x15)))
        if USE_ASM:
            part = tl.inline_asm_elementwise(
                WORD_DOT_ASM, "=f,r,r,r,r,r,r,r,r,r",
                [words, _pair(x0, x8, field, 0), _pair(x1, x9, field, 1), _pair(x2, x10, field, 2),
                 _pair(x3, x11, field, 3), _pair(x4, x12, field, 4), _pair(x5, x13, field, 5),
                 _pair(x6, x14, field, 6), _pair(x7, x15, field, 7)],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            a_lo = tl.zeros(words.shape, tl.float16)
            a_hi = tl.zeros(words.shape, tl.float16)
            a_lo, a_hi = _emulated_step(a_lo, a_hi, words, x0, x8, field, 0)
            a_lo, a_hi = _emulated_step(a_lo, a_hi, words, x1, x9, field, 1)
            a_lo, a_hi = _emulated_step(a_lo, a_hi, words, x2, x10, field, 2)
            a_lo, a_hi = _emulated_step(a_lo, a_hi, words, x3, x11, field, 3)
            a_lo, a_hi = _emulated_step(a_lo, a_hi, words, x4, x12, field, 4)
            a_lo, a_hi = _emulated_step(a_lo, a_hi, words, x5, x13, field, 5)
            a_lo, a_hi = _emulated_step(a_lo, a_hi, words, x6, x14, field, 6)
            a_lo, a_hi = _emulated_step(a_lo, a_hi, words, x7, x15, field, 7)
            part = a_lo.to(tl.float32) + a_hi.to(tl.float32)
        p = tl.sum(part * inv[None, :, :], axis=2)
        s_b = tl.sum(xsum, axis=1)
        acc += al * p + mu * s_b[None, :]
    y = tl.sum(acc, axis=1)
    if SPLIT_OUT:
        tl.store(out_ptr + (pid_k * M + m) * N + rows, y, mask=row_ok)
    else:
        if HAS_BIAS:
            y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * N + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


# Without autotuning: the smallest config keeps the interpreter fast; on a GPU the one within 10 %
# of the best on all seven measured shapes.
_FIXED_CONFIG = {"BN": 16, "NBT": 2} if INTERPRET else {"BN": 8, "NBT": 32, "num_warps": 2}


def ternary_gemv_half2(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                       bias, perm, out: torch.Tensor, split: int = 1, config=None) -> torch.Tensor:
    """y = x[:, perm] @ W^T + bias into ``out`` (M, N), x bf16/fp16 (M, K) with unit stride along K.
    ``config``: a fixed {"BN", "NBT", "num_warps"} (experiments), else autotuned / the default."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"ternary_gemv_half2 takes bf16/fp16 activations, got {x.dtype}")
    m, n = x.shape[0], packed.shape[0]
    args, split, target = launch_args("ternary_gemv_half2", x, packed, alpha, mu, bias, perm, out, split)
    meta = dict(HAS_BIAS=bias is not None, HAS_PERM=perm is not None, SPLIT_OUT=split > 1,
                USE_ASM=not INTERPRET)
    kernel = ternary_gemv_half2_kernel
    if config is not None or not AUTOTUNE:
        cfg = dict(config or _FIXED_CONFIG)
        if AUTOTUNE:
            kernel = kernel.fn
        launch(kernel, (triton.cdiv(n, cfg["BN"]), split, m), *args, **meta, **cfg)
    else:
        launch(kernel, lambda META: (triton.cdiv(n, META["BN"]), split, m), *args, **meta)
    if split > 1:
        splitk_reduce(target, bias, out)
    return out
