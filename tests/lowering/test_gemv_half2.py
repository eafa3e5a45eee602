"""The half2 GEMV (M = 1, bf16/fp16 x): its arithmetic under the Triton interpreter (the plain
fp16 emulation of the PTX), and the PTX text itself, executed by a small numpy model of its
instructions, since no CPU can run inline PTX."""
import re

import numpy as np
import pytest
import torch

from pt2pass.lowering.format import pack_ternary
from pt2pass.lowering.kernels import dispatch
from pt2pass.lowering.kernels.common import INTERPRET
from pt2pass.lowering.kernels.gemv_half2 import WORD_DOT_ASM, ternary_gemv_half2
from pt2pass.lowering.reference import ternary_linear_reference

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def _layer(n, k, seed, bias, perm, dtype):
    g = torch.Generator().manual_seed(seed)
    T = torch.randint(-1, 2, (n, k), generator=g)
    alpha = ((torch.rand(n, k // 128, generator=g) + 0.5) * 0.1).to(dtype)
    mu = (torch.randn(n, k // 128, generator=g) * 0.02).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    p = torch.randperm(k, generator=g) if perm else None
    return pack_ternary(T), alpha, mu, b, p


def _run(x, n, seed, bias=False, perm=False, split=1):
    packed, alpha, mu, b, p = _layer(n, x.shape[1], seed, bias, perm, x.dtype)
    ref = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double(),
                                   None if b is None else b.double(), p)
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype)
    ternary_gemv_half2(x, packed, alpha, mu, b, p, out, split=split)
    return out, ref


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("m,n,k,dtype,bias,perm,split", [
    (1, 32, 128, torch.bfloat16, False, False, 1),
    (1, 40, 384, torch.float16, True, True, 1),
    (1, 48, 512, torch.bfloat16, True, False, 3),
    (2, 17, 256, torch.float16, False, True, 2),
])
def test_matches_reference(m, n, k, dtype, bias, perm, split):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    out, ref = _run(x, n, seed=n + k, bias=bias, perm=perm, split=split)
    assert not out.isnan().any()
    assert _rel(out, ref) < TOL[dtype]


def test_wide_dynamic_range_neither_overflows_nor_underflows_fp16():
    # |x| from 1e-6 to 1e6 in bf16: beyond fp16's range on both ends. The per-word power-of-two
    # scale keeps every fp16 partial sum in range; without it the products would be inf / 0.
    k = 512
    g = torch.Generator().manual_seed(5)
    mags = torch.logspace(-6, 6, k)[torch.randperm(k, generator=g)]
    x = (torch.randn(1, k, generator=g).sign() * mags).to(torch.bfloat16)
    out, ref = _run(x, 24, seed=9)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < TOL[torch.bfloat16]


def test_nan_and_inf_in_x_propagate():
    x = torch.randn(1, 256).to(torch.bfloat16)
    x[0, 7] = float("nan")
    out, _ = _run(x, 16, seed=1)
    assert out.isnan().all()  # every row has a nonzero alpha or mu on column 7's block
    x = torch.randn(1, 256).to(torch.float16)
    x[0, 200] = float("inf")
    out, _ = _run(x, 16, seed=2)
    assert not torch.isfinite(out).any()


def test_rejects_float32_activations():
    packed, alpha, mu, _, _ = _layer(16, 128, 0, False, False, torch.float32)
    with pytest.raises(ValueError, match="bf16/fp16"):
        ternary_gemv_half2(torch.randn(1, 128), packed, alpha, mu, None, None, torch.empty(1, 16))


def test_dispatcher_sends_half_precision_m1_here_and_float32_to_the_fp32_gemv(monkeypatch):
    calls = []
    for name in ("ternary_gemv", "ternary_gemv_half2"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    packed, alpha, mu, _, _ = _layer(16, 256, 0, False, False, torch.float32)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        dispatch.ternary_linear_triton(torch.randn(1, 1, 256).to(dtype), packed, alpha.to(dtype), mu.to(dtype))
    assert calls == ["ternary_gemv_half2", "ternary_gemv_half2", "ternary_gemv"]


# --- the PTX text, executed by a numpy model of the instructions it uses -----------------------

def _half2(v: np.uint32):
    return np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16)


def _bits(h) -> np.uint32:
    u = np.asarray(h, dtype=np.float16).view(np.uint16).astype(np.uint32)
    return np.uint32(u[0] | (u[1] << 16))


def _run_ptx(word: int, pairs) -> float:
    """Execute WORD_DOT_ASM for one word ($1) and eight half2 operands ($2..$9)."""
    reg = {"$1": np.uint32(word)}
    reg.update({f"${2 + i}": p for i, p in enumerate(pairs)})
    val = lambda a: reg[a] if a in reg else np.uint32(int(a, 0))  # noqa: E731
    for stmt in WORD_DOT_ASM.value.split(";"):
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
    return float(reg["$0"])


def test_ptx_computes_the_word_dot_product_exactly_on_representable_inputs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        codes = rng.integers(0, 3, 16)  # q = T + 1 of slots 0..15, at bits 2 * slot
        word = int(sum(int(q) << (2 * s) for s, q in enumerate(codes)))
        x = rng.integers(-64, 65, 16) / 4.0  # exact in fp16, and so are the partial sums
        pairs = []
        for s in range(8):
            sp = s if s < 5 else s - 5  # the kernel's pre-scale of slot pair s by 4^-s'
            pairs.append(_bits(np.array([x[s], x[s + 8]]) / 4.0 ** sp))
        expected = float(np.dot(codes - 1, x))
        assert _run_ptx(word, pairs) == expected


def test_kernel_source_survives_torch_compile_copying_it():
    # Inductor pastes a user kernel's source (with its constexpr globals, such as the PTX) into a
    # triple-quoted string of the generated module; a multi-line PTX constant broke that module
    # on the GPU (unterminated string literal). Both levels must parse.
    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code
    from triton.runtime.jit import JITFunction

    from pt2pass.lowering.kernels.gemv_half2 import ternary_gemv_half2_kernel

    # the interpreter wraps kernels differently: rebuild the GPU-side JITFunction of the same code
    kernel = JITFunction(ternary_gemv_half2_kernel.fn)
    src = user_defined_triton_kernel_transitive_closure_source_code(kernel)
    assert "WORD_DOT_ASM = tl.constexpr(" in src
    namespace = {}
    exec(compile(f"generated = '''\n{src}\n'''", "generated_module", "exec"), namespace)
    compile(namespace["generated"], "kernel_source", "exec")
