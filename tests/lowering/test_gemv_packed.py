"""The prepacked-x GEMVs (M = 1 for large N, M = 2) and their prepack pass, under the Triton
interpreter (plain fp16 emulation of the PTX; the PTX itself: test_half2.py)."""
import pytest
import torch
from conftest import gemv_vs_reference, random_ternary_layer_cpu, rel_err

from pt2pass.lowering.kernels.common import INTERPRET
from pt2pass.lowering.kernels.gemv_packed import prepack_x, ternary_gemv_packed

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def _run(x, n, seed, bias=False, perm=False, split=1):
    return gemv_vs_reference(ternary_gemv_packed, x, n, seed, bias, perm, split)


@pytest.mark.parametrize("perm", [False, True])
def test_prepack_holds_the_scaled_pairs_the_scales_and_the_block_sums(perm):
    m, k = 2, 256
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 3, k)[torch.randperm(k, generator=g)]).to(torch.bfloat16)
    p = torch.randperm(k, generator=g) if perm else None
    xp, inv, xs = prepack_x(x, p)
    xq = (x[:, p] if perm else x).float()
    cols = xq.view(m, k // 128, 16, 8)  # (m, block b, slot s, word j): column 128 b + 8 s + j
    e = torch.frexp(cols.abs().amax(dim=2))[1] - 1  # 2^e <= max |x| of the word < 2^(e + 1)
    c = torch.exp2(11.0 - e.float())  # (m, b, j)
    assert torch.equal(inv.view(m, k // 128, 8), 1.0 / c)
    for s in range(8):
        sp = s if s < 5 else s - 5
        halves = (xp[:, s].view(m, k // 128, 8).unsqueeze(-1) >> torch.tensor([0, 16])) & 0xFFFF
        got = halves.to(torch.int16).view(torch.float16).float()
        want = torch.stack([cols[:, :, s], cols[:, :, s + 8]], dim=-1) * (c * 4.0 ** -sp).unsqueeze(-1)
        assert torch.equal(got, want.half().float())
    assert torch.allclose(xs, cols.sum(dim=(2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,n,k,dtype,bias,perm,split", [
    (1, 32, 128, torch.bfloat16, False, False, 1),
    (1, 40, 384, torch.float16, True, True, 1),
    (1, 48, 512, torch.bfloat16, True, False, 3),
    (2, 17, 256, torch.float16, False, True, 2),
    (2, 24, 384, torch.bfloat16, True, True, 1),
    (3, 20, 256, torch.bfloat16, True, False, 1),  # two tiles of two rows, the last half empty
])
def test_matches_reference(m, n, k, dtype, bias, perm, split):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k + m)).to(dtype)
    out, ref = _run(x, n, seed=n + k, bias=bias, perm=perm, split=split)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]
    assert all(rel_err(out[i:i + 1], ref[i:i + 1]) < TOL[dtype] for i in range(m))


@pytest.mark.parametrize("m", [1, 2])
def test_wide_dynamic_range_neither_overflows_nor_underflows_fp16(m):
    k = 512
    g = torch.Generator().manual_seed(5)
    mags = torch.logspace(-6, 6, k)[torch.randperm(k, generator=g)]
    x = (torch.randn(m, k, generator=g).sign() * mags).to(torch.bfloat16)
    out, ref = _run(x, 24, seed=9)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_nan_and_inf_in_x_propagate_to_their_row_only():
    x = torch.randn(2, 256).to(torch.bfloat16)
    x[0, 7] = float("nan")
    out, _ = _run(x, 16, seed=1)
    assert out[0].isnan().all() and torch.isfinite(out[1]).all()
    x = torch.randn(1, 256).to(torch.float16)
    x[0, 200] = float("inf")
    out, _ = _run(x, 16, seed=2)
    assert not torch.isfinite(out).any()


def test_rejects_float32_activations():
    packed, alpha, mu, _, _ = random_ternary_layer_cpu(16, 128, 0, False, False, torch.float32)
    with pytest.raises(ValueError, match="bf16/fp16"):
        ternary_gemv_packed(torch.randn(1, 128), packed, alpha, mu, None, None, torch.empty(1, 16))
