"""The inline PTX of half2.py and dp2a.py, executed by a small numpy model of its instructions (no
CPU can run PTX), and the kernels' sources surviving torch.compile's copy of them."""
import re

import numpy as np
import pytest

from pt2pass.lowering.kernels import dp2a
from pt2pass.lowering.kernels.half2 import DECODE_ASM, DOT_ASM, WORD_DOT_ASM


def _half2(v: np.uint32):
    return np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16)


def _bits(h) -> np.uint32:
    u = np.asarray(h, dtype=np.float16).view(np.uint16).astype(np.uint32)
    return np.uint32(u[0] | (u[1] << 16))


def _run_ptx(asm: str, reg: dict) -> dict:
    """Execute ``asm`` on the registers ``reg`` ({"$1": np.uint32, ...}); returns them all."""
    reg = dict(reg)
    val = lambda a: reg[a] if a in reg else np.uint32(int(a, 0))  # noqa: E731
    for stmt in asm.split(";"):
        stmt = stmt.strip().removeprefix("{ ").strip()
        op, _, rest = stmt.partition(" ")
        args = [a.strip() for a in re.split(r",(?![^{]*})", rest)] if rest else []
        if op in ("", "}", ".reg"):
            continue
        if op == "shr.u32":
            reg[args[0]] = np.uint32(val(args[1]) >> int(args[2]))
        elif op == "lop3.b32":
            assert args[4] == "0xea"  # (a & b) | c
            reg[args[0]] = np.uint32((val(args[1]) & val(args[2])) | val(args[3]))
        elif op == "mov.b32" and args[0].startswith("{"):
            lo, hi = (a.strip() for a in args[0].strip("{}").split(","))
            reg[lo], reg[hi] = _half2(val(args[1]))
        elif op == "mov.b32":
            reg[args[0]] = val(args[1])
        elif op == "and.b32":
            reg[args[0]] = np.uint32(val(args[1]) & val(args[2]))
        elif op in ("dp2a.lo.s32.u32", "dp2a.hi.s32.u32"):  # a: two s16, b: four u8 (lo: bytes 0, 1)
            a, b, c = (int(val(r)) for r in args[1:4])
            s16 = [((a >> sh) & 0xFFFF) - ((a >> sh) & 0x8000) * 2 for sh in (0, 16)]
            first = 0 if op.startswith("dp2a.lo") else 2
            u8 = [(b >> (8 * (first + i))) & 0xFF for i in range(2)]
            reg[args[0]] = np.uint32((c + s16[0] * u8[0] + s16[1] * u8[1]) & 0xFFFFFFFF)
        elif op in ("sub.f16x2", "mul.f16x2", "fma.rn.f16x2"):
            a, b = (_half2(val(r)).astype(np.float64) for r in args[1:3])
            r = a - b if op == "sub.f16x2" else a * b
            if op == "fma.rn.f16x2":
                r = r + _half2(val(args[3])).astype(np.float64)
            reg[args[0]] = _bits(r.astype(np.float16))  # one rounding, as in PTX
        elif op == "cvt.f32.f16":
            reg[args[0]] = np.float32(reg[args[1]])
        elif op == "add.f32":
            reg[args[0]] = np.float32(reg[args[1]] + reg[args[2]])
        else:
            raise AssertionError(f"the numpy model does not know {op!r}: extend it with the PTX")
    return reg


def _random_word_and_pairs(rng):
    codes = rng.integers(0, 3, 16)  # q = T + 1 of slots 0..15, at bits 2 * slot
    word = np.uint32(sum(int(q) << (2 * s) for s, q in enumerate(codes)))
    x = rng.integers(-64, 65, 16) / 4.0  # exact in fp16, and so are the partial sums
    # the kernels' pre-scale of slot pair s by 4^-s' (s' = s for s < 5, else s - 5)
    pairs = [_bits(np.array([x[s], x[s + 8]]) / 4.0 ** (s if s < 5 else s - 5)) for s in range(8)]
    return word, pairs, float(np.dot(codes - 1, x))


@pytest.mark.parametrize("seed", range(5))
def test_word_dot_ptx_computes_the_word_dot_product_exactly(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        word, pairs, expected = _random_word_and_pairs(rng)
        reg = {"$1": word, **{f"${2 + i}": p for i, p in enumerate(pairs)}}
        assert float(_run_ptx(WORD_DOT_ASM.value, reg)["$0"]) == expected


def test_decode_then_dot_ptx_equals_the_fused_ptx_for_two_rows_of_x():
    rng = np.random.default_rng(7)
    for _ in range(20):
        word, pairs_a, expected_a = _random_word_and_pairs(rng)
        _, pairs_b, _ = _random_word_and_pairs(rng)
        codes = [(int(word) >> (2 * s)) & 3 for s in range(16)]
        t = _run_ptx(DECODE_ASM.value, {"$8": word})
        for s in range(8):  # each output: T * 4^s' of slots s (low) and s + 8 (high)
            sp = 4.0 ** (s if s < 5 else s - 5)
            assert list(_half2(t[f"${s}"])) == [(codes[s] - 1) * sp, (codes[s + 8] - 1) * sp]
        for pairs, expected in ((pairs_a, expected_a), (pairs_b, None)):
            reg = {**{f"${1 + s}": t[f"${s}"] for s in range(8)}, **{f"${9 + s}": p for s, p in enumerate(pairs)}}
            got = float(_run_ptx(DOT_ASM.value, reg)["$0"])
            fused = float(_run_ptx(WORD_DOT_ASM.value, {"$1": word, **{f"${2 + i}": p for i, p in enumerate(pairs)}})["$0"])
            assert got == fused
            if expected is not None:
                assert got == expected


@pytest.mark.parametrize("seed", range(5))
def test_dp2a_word_dot_ptx_is_the_exact_integer_dot_product(seed):
    rng = np.random.default_rng(seed)
    for extreme in (False, True):
        codes = np.full(16, 2) if extreme else rng.integers(0, 3, 16)  # q = T + 1 of slots 0..15
        x = np.full(16, -dp2a.X_MAX.value) if extreme else rng.integers(-dp2a.X_MAX.value, dp2a.X_MAX.value + 1, 16)
        word = np.uint32(sum(int(q) << (2 * s) for s, q in enumerate(codes)))
        # pair p = 2 r + h holds slots 8 h + r (low 16 bits) and 8 h + 4 + r (high)
        pairs = {f"${2 + 2 * r + h}": np.uint32((int(x[8 * h + r]) & 0xFFFF) | ((int(x[8 * h + 4 + r]) & 0xFFFF) << 16))
                 for r in range(4) for h in range(2)}
        got = int(_run_ptx(dp2a.WORD_DOT_ASM.value, {"$1": word, **pairs})["$0"])
        assert got - (1 << 32) * (got >> 31) == int(np.dot(codes, x))


def test_every_ptx_constant_is_one_line():
    for asm in (WORD_DOT_ASM, DECODE_ASM, DOT_ASM, dp2a.WORD_DOT_ASM):
        assert "\n" not in asm.value


_SOURCE_CHECK = r"""
import importlib, sys
from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code
from triton.runtime.jit import JITFunction
for case in sys.argv[1:]:
    module, kernel, *constants = case.split(":")
    fn = getattr(importlib.import_module("pt2pass.lowering.kernels." + module), kernel)
    while not isinstance(fn, JITFunction):  # the autotuner wraps it
        fn = fn.fn
    src = user_defined_triton_kernel_transitive_closure_source_code(fn)
    namespace = {}
    q = "'" * 3
    exec(compile("generated = " + q + "\n" + src + "\n" + q, "generated_module", "exec"), namespace)
    compile(namespace["generated"], "kernel_source", "exec")
    for name in constants:
        assert name + " = tl.constexpr(" in src, (kernel, name)
print("sources ok")
"""


def test_kernel_sources_survive_torch_compile_copying_them():
    # Inductor pastes a user kernel's source (with its helpers and constexpr globals, such as the
    # PTX) into a triple-quoted string of the generated module; a multi-line PTX constant broke
    # that module on the GPU (unterminated string literal). Both levels must parse. Run without
    # the interpreter, whose wrapped helpers Inductor cannot follow.
    import os
    import subprocess
    import sys

    cases = ["gemv_half2:ternary_gemv_half2_kernel:WORD_DOT_ASM",
             "gemv_dp2a:ternary_gemv_dp2a_kernel:WORD_DOT_ASM",
             "gemv_dp2a:_quantize_x_kernel",
             "gemv_group:ternary_gemv_group_kernel:WORD_DOT_ASM",
             "gemv_packed:ternary_gemv_packed_rows_kernel:DECODE_ASM:DOT_ASM",
             "gemv_packed:_prepack_x_kernel",
             "gemv_imma:ternary_gemv_imma_kernel:MMA_S8:MMA_U8:CODE_BYTES:FRAGMENT_WORDS:STAT_WORDS",
             "gemv_imma:_quantize_x_imma_kernel:FRAGMENT_WORDS:STAT_WORDS"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SOURCE_CHECK, *cases], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "sources ok" in res.stdout, res.stderr[-3000:]
