"""The half2 GEMV with x prepared in every program (M = 1, bf16/fp16 x, fewer than DP2A_MIN_WEIGHTS weights) under
the Triton interpreter (the plain fp16 emulation of the PTX; the PTX itself: test_half2.py), and
the dispatcher's choice among the GEMV kernels."""
import pytest
import torch
from conftest import gemv_vs_reference, random_ternary_layer_cpu, rel_err

from pt2pass.lowering.kernels import dispatch
from pt2pass.lowering.kernels.common import INTERPRET
from pt2pass.lowering.kernels.gemv_half2 import ternary_gemv_half2

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def _run(x, n, seed, bias=False, perm=False, split=1):
    return gemv_vs_reference(ternary_gemv_half2, x, n, seed, bias, perm, split)


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
    assert rel_err(out, ref) < TOL[dtype]


def test_wide_dynamic_range_neither_overflows_nor_underflows_fp16():
    # |x| from 1e-6 to 1e6 in bf16: beyond fp16's range on both ends. The per-word power-of-two
    # scale keeps every fp16 partial sum in range; without it the products would be inf / 0.
    k = 512
    g = torch.Generator().manual_seed(5)
    mags = torch.logspace(-6, 6, k)[torch.randperm(k, generator=g)]
    x = (torch.randn(1, k, generator=g).sign() * mags).to(torch.bfloat16)
    out, ref = _run(x, 24, seed=9)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.bfloat16]


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
    packed, alpha, mu, _, _ = random_ternary_layer_cpu(16, 128, 0, False, False, torch.float32)
    with pytest.raises(ValueError, match="bf16/fp16"):
        ternary_gemv_half2(torch.randn(1, 128), packed, alpha, mu, None, None, torch.empty(1, 16))


def test_dispatcher_picks_the_gemv_by_dtype_m_and_n(monkeypatch):
    calls = []
    for name in ("ternary_gemv", "ternary_gemv_half2", "ternary_gemv_dp2a", "ternary_gemv_packed", "ternary_gemv_imma",
                 "ternary_gemm"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    monkeypatch.setattr(dispatch, "DP2A_MIN_WEIGHTS", 32 * 256)  # the real 32 M weights are slow to interpret
    for n in (16, 32):
        packed, alpha, mu, _, _ = random_ternary_layer_cpu(n, 256, 0, False, False, torch.float32)
        for m, dtype in ((1, torch.bfloat16), (1, torch.float16), (1, torch.float32),
                         (2, torch.bfloat16), (2, torch.float32), (3, torch.float16)):
            x = torch.randn(1, m, 256).to(dtype)
            dispatch.ternary_linear_triton(x, packed, alpha.to(dtype), mu.to(dtype))
    small = ["ternary_gemv_half2", "ternary_gemv_half2", "ternary_gemv", "ternary_gemv_packed",
             "ternary_gemm", "ternary_gemv_imma"]
    big = ["ternary_gemv_dp2a", "ternary_gemv_dp2a", "ternary_gemv", "ternary_gemv_imma", "ternary_gemm",
           "ternary_gemv_imma"]
    assert calls == small + big
