"""The int16-x / dp2a GEMV and its quantizing prepack, under the Triton interpreter (exact int32
emulation of the PTX; the PTX itself is checked on the GPU by benchmarks/fuzz_kernels.py)."""
import pytest
import torch
from conftest import gemv_vs_reference, random_ternary_layer_cpu, rel_err

from pt2pass.lowering.format import pack_ternary
from pt2pass.lowering.kernels.common import INTERPRET, tma_supported
from pt2pass.lowering.kernels.dp2a import X_MAX as _X_MAX
from pt2pass.lowering.kernels.gemv_dp2a import quantize_x, ternary_gemv_dp2a

X_MAX = _X_MAX.value  # a tl.constexpr in the kernels
pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _x(m, k, seed, dtype=torch.bfloat16, spread=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.logspace(-spread, spread, k)[torch.randperm(k, generator=g)]).to(dtype)


def _unpack_pairs(xp, m, k):
    """x_int (m, k) back from the pairs: pair p = 2 r + h holds slots 8 h + r and 8 h + 4 + r."""
    out = torch.zeros(m, k // 128, 16, 8, dtype=torch.int64)  # (m, block, slot, word j)
    for p in range(8):
        r, h = p // 2, p % 2
        v = xp[:, p].view(m, k // 128, 8).long()
        out[:, :, 8 * h + r] = ((v & 0xFFFF) ^ 0x8000) - 0x8000
        out[:, :, 8 * h + 4 + r] = v >> 16
    return out


@pytest.mark.parametrize("perm", [False, True])
def test_quantize_gives_the_int16_pairs_scales_and_sums(perm):
    m, k = 2, 384
    x = _x(m, k, seed=3)
    p = torch.randperm(k, generator=torch.Generator().manual_seed(4)) if perm else None
    xp, scale, xint, xs = quantize_x(x, p)
    cols = (x[:, p] if perm else x).float().view(m, k // 128, 16, 8)
    want_scale = cols.abs().amax(dim=(2, 3)) / X_MAX
    assert torch.allclose(scale, want_scale, rtol=1e-6, atol=0)
    got = _unpack_pairs(xp, m, k)
    t = cols / scale[:, :, None, None]
    assert torch.equal(got, (t.sign() * (t.abs() + 0.5).floor()).long())  # halves away from zero
    assert got.abs().max() == X_MAX
    assert torch.equal(xint.long(), got.sum(dim=(2, 3)))
    assert torch.allclose(xs, cols.sum(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_word_dot_is_exact_on_extreme_codes_and_values():
    # every code 2 (T = +1) against x_int = +-X_MAX: the largest integer sums the kernel forms
    k, n = 256, 8
    T = torch.ones(n, k, dtype=torch.int64)
    T[1::2] = -1
    x = torch.full((1, k), 3.0, dtype=torch.float16)
    x[0, ::3] = -3.0
    alpha = torch.ones(n, k // 128, dtype=torch.float16)
    mu = torch.zeros(n, k // 128, dtype=torch.float16)
    out = torch.empty(1, n, dtype=torch.float16)
    ternary_gemv_dp2a(x, pack_ternary(T), alpha, mu, None, None, out)
    assert torch.equal(out.double(), x.double() @ T.double().T)  # integers <= 768: exact in fp16


@pytest.mark.parametrize("n,k,dtype,bias,perm,split", [
    (32, 128, torch.bfloat16, False, False, 1),
    (40, 384, torch.float16, True, True, 1),
    (48, 512, torch.bfloat16, True, False, 3),
    (17, 256, torch.float16, False, True, 2),
])
def test_matches_reference(n, k, dtype, bias, perm, split):
    x = _x(1, k, seed=k + n, dtype=dtype, spread=1)
    out, ref = gemv_vs_reference(ternary_gemv_dp2a, x, n, seed=n + k, bias=bias, perm=perm, split=split)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


def test_two_rows_each_use_their_own_scales():
    x = torch.cat([_x(1, 256, seed=1) * 1e-3, _x(1, 256, seed=2) * 1e3]).to(torch.bfloat16)
    out, ref = gemv_vs_reference(ternary_gemv_dp2a, x, 24, seed=5)
    assert all(rel_err(out[i:i + 1], ref[i:i + 1]) < TOL[torch.bfloat16] for i in range(2))


def test_wide_dynamic_range_stays_accurate():
    x = _x(1, 512, seed=5, spread=6)
    out, ref = gemv_vs_reference(ternary_gemv_dp2a, x, 24, seed=9)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_zero_block_and_nan_and_inf():
    x = torch.randn(1, 384).to(torch.bfloat16)
    x[0, 128:256] = 0
    out, ref = gemv_vs_reference(ternary_gemv_dp2a, x, 16, seed=1)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 256).to(torch.float16)
        x[0, 200] = bad
        out, _ = gemv_vs_reference(ternary_gemv_dp2a, x, 16, seed=2)
        assert out.isnan().all()


def test_tiny_blocks_lose_levels_not_sense():
    # scale >= 2^-126: full precision down to ~4e-34; below ~1e-34, where 1 / (max / X_MAX) would
    # overflow float32 (x_int garbage), a block keeps fewer levels, each x_int within half a level
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 256, generator=g)
    x[0] *= 1e-32
    x[1] *= 1e-36
    x[2, :128] *= 1e-36  # one such block next to a normal one
    x = x.to(torch.bfloat16)
    xp, scale, xint, _ = quantize_x(x, None)
    x_int = _unpack_pairs(xp, 3, 256)
    assert torch.isfinite(scale).all() and (scale >= 2.0 ** -126).all()
    assert x_int.abs().max() <= X_MAX and torch.equal(xint.long(), x_int.sum(dim=(2, 3)))
    levels = x.double().view(3, 2, 16, 8) / scale.double()[:, :, None, None]
    normal = x.double().view(3, 2, 16, 8).abs() >= 2.0 ** -126  # the interpreter's bf16 subnormals are off
    assert ((x_int - levels).abs()[normal] <= 0.51).all()  # float32 x * (1 / scale): ~1e-3 of a level
    out, ref = gemv_vs_reference(ternary_gemv_dp2a, x, 16, seed=3)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_rejects_float32_activations():
    packed, alpha, mu, _, _ = random_ternary_layer_cpu(16, 128, 0, False, False, torch.float32)
    with pytest.raises(ValueError, match="bf16/fp16"):
        ternary_gemv_dp2a(torch.randn(1, 128), packed, alpha, mu, None, None, torch.empty(1, 16))


@pytest.mark.parametrize("n,k,bias,perm,split,config", [
    (40, 384, True, True, 1, None),                                  # rows past N in the last tile
    (48, 1024, False, False, 3, None),                               # tiles crossing the K splits
    (24, 512, True, False, 1, {"BN": 8, "NBT": 4, "STAGES": 3}),     # deeper pipeline, loop of 1
    (33, 1024, False, True, 2, {"BN": 16, "NBT": 2, "STAGES": 2}),
])
def test_tma_streaming_equals_plain_loads_bit_for_bit(n, k, bias, perm, split, config):
    """Same arithmetic, only how the words reach the registers differs (TMA zero-fills outside W)."""
    x = _x(1, k, seed=n, spread=2)
    (tma_out, ref), (plain_out, _) = [gemv_vs_reference(ternary_gemv_dp2a, x, n, seed=k, bias=bias, perm=perm,
                                                        split=split, config=config, tma=tma) for tma in (True, False)]
    assert torch.equal(tma_out, plain_out)
    assert rel_err(tma_out, ref) < TOL[torch.bfloat16]


def test_tma_needs_16_byte_aligned_weight_rows():
    packed = torch.zeros(8, 64, dtype=torch.int32)
    assert tma_supported(packed)
    assert not tma_supported(packed.view(-1)[1:1 + 8 * 32].view(8, 32))  # base 4 bytes off
    assert not tma_supported(packed[:, 8:40])                            # not contiguous
    assert tma_supported(packed[2:6])                                     # whole rows: aligned


def test_tma_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("PT2PASS_TMA", "0")
    assert not tma_supported(torch.zeros(8, 64, dtype=torch.int32))


def test_scratch_allocator_is_installed_once_and_never_replaces_the_users():
    """In-kernel TMA descriptors need Triton's global scratch allocator (CUDA only: checked here
    without allocating). Each case runs in its own context: triton.set_allocator is context-local."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    from pt2pass.lowering.kernels import common

    def installed_after(initial):
        if initial is not None:
            triton.set_allocator(initial)
        common.ensure_scratch_allocator()
        return _allocation._allocator.get()

    assert contextvars.Context().run(installed_after, None) is common._scratch
    mine = lambda size, alignment, stream: None  # noqa: E731
    assert contextvars.Context().run(installed_after, mine) is mine
