"""The Triton kernels, run by the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), against the float64 reference; and the dispatcher's choice of path."""
import pytest
import torch

from pt2pass.lowering.format import pack_ternary
from pt2pass.lowering.kernels import dispatch
from pt2pass.lowering.kernels.common import INTERPRET
from pt2pass.lowering.kernels.gemm import ternary_gemm
from pt2pass.lowering.kernels.gemv import ternary_gemv
from pt2pass.lowering.reference import ternary_linear_reference

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")

# fp32 carries the kernels' own error (the GEMV's x' cancellation: ~1e-5); bf16 / fp16 add the
# rounding of the output (and, in the GEMM on a GPU, of the folded weight).
TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def _layer(n, k, seed, bias=False, perm=False, scale_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = torch.randint(-1, 2, (n, k), generator=g)
    alpha = ((torch.rand(n, k // 128, generator=g) + 0.5) * 0.1).to(scale_dtype)
    mu = (torch.randn(n, k // 128, generator=g) * 0.02).to(scale_dtype)
    b = torch.randn(n, generator=g) if bias else None
    p = torch.randperm(k, generator=g) if perm else None
    return pack_ternary(T), alpha, mu, b, p


def _check(fn, m, n, k, dtype, bias, perm, split, seed):
    packed, alpha, mu, b, p = _layer(n, k, seed, bias, perm)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ref = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double(),
                                   None if b is None else b.double(), p)
    out = torch.full((m, n), float("nan"), dtype=dtype)  # poisoned: every element must be written
    fn(x, packed, alpha, mu, b, p, out, split=split)
    assert not out.isnan().any()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e}"


CASES = [  # m, n, k, dtype, bias, perm, split
    (1, 32, 128, torch.float32, False, False, 1),
    (1, 48, 256, torch.float32, True, True, 1),
    (3, 32, 256, torch.float32, True, False, 2),
    (1, 48, 384, torch.bfloat16, False, True, 3),
    (2, 32, 256, torch.float16, True, True, 1),
    (17, 32, 128, torch.float32, False, True, 1),
]


@pytest.mark.parametrize("m,n,k,dtype,bias,perm,split", CASES)
def test_gemv_matches_reference(m, n, k, dtype, bias, perm, split):
    _check(ternary_gemv, m, n, k, dtype, bias, perm, split, seed=m * 7 + n + k)


@pytest.mark.parametrize("m,n,k,dtype,bias,perm,split", CASES + [(17, 48, 256, torch.bfloat16, True, False, 1)])
def test_gemm_matches_reference(m, n, k, dtype, bias, perm, split):
    _check(ternary_gemm, m, n, k, dtype, bias, perm, split, seed=m * 5 + n + k)


@pytest.mark.parametrize("m,n,k,dtype,bias,perm,split", [CASES[2], CASES[4], (17, 48, 256, torch.bfloat16, True, True, 1),
                                                         (40, 32, 384, torch.float16, False, True, 3)])
def test_gemm_swapped_operands_match_reference(m, n, k, dtype, bias, perm, split):
    """SWAP: the MMA computes y^T = W x^T (the weight tile as the register operand); BM and BN
    unequal so a transposed store or mask would show."""
    swap = {"BM": 32, "BN": 16, "GROUP_M": 2, "SWAP": True}
    _check(lambda *a, **kw: ternary_gemm(*a, **kw, config=swap), m, n, k, dtype, bias, perm, split, seed=m + n + k)


def test_gemv_accepts_bf16_scales_and_strided_rows():
    packed, alpha, mu, _, _ = _layer(32, 256, 3, scale_dtype=torch.bfloat16)
    x = torch.randn(2, 512)[:, :256]  # row stride 512, unit stride along K
    ref = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double())
    out = torch.empty(2, 32)
    ternary_gemv(x, packed, alpha, mu, None, None, out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fn", [ternary_gemv, ternary_gemm])
def test_kernels_reject_k_not_multiple_of_128(fn):
    T = torch.randint(-1, 2, (32, 576))
    alpha = torch.ones(32, 5)
    with pytest.raises(ValueError, match="K % 128 == 0"):
        fn(torch.randn(1, 576), pack_ternary(T), alpha, alpha, None, None, torch.empty(1, 32))


def _record(monkeypatch):
    calls = []
    for name in ("ternary_gemv", "ternary_gemm"):
        real = getattr(dispatch, name)

        def wrapper(x, *args, _real=real, _name=name, **kw):
            calls.append((_name, tuple(x.shape), args[4] is not None, kw.get("split")))
            return _real(x, *args, **kw)
        monkeypatch.setattr(dispatch, name, wrapper)
    return calls


@pytest.mark.parametrize("shape,path,gathered", [((1, 256), "ternary_gemv", True), ((1, 1, 256), "ternary_gemv", True),
                                                 ((2, 1, 256), "ternary_gemm", True), ((3, 256), "ternary_gemm", True),
                                                 ((2, 17, 256), "ternary_gemm", False), ((2, 256, 256), None, False)])
def test_dispatcher_picks_the_path_by_m(monkeypatch, shape, path, gathered):
    calls = _record(monkeypatch)
    packed, alpha, mu, b, p = _layer(48, 256, 11, bias=True, perm=True)
    x = torch.randn(*shape)
    y = dispatch.ternary_linear_triton(x, packed, alpha, mu, b, p)
    assert y.shape == (*shape[:-1], 48)
    m = x.numel() // 256
    # perm gathered in the kernel or x permuted first; M >= DEQUANT_MIN_M: dequantize + torch.mm
    assert [c[:3] for c in calls] == ([(path, (m, 256), gathered)] if path else [])
    torch.testing.assert_close(y, ternary_linear_reference(x, packed, alpha, mu, b, p), rtol=1e-4, atol=1e-4)


def test_dispatcher_falls_back_to_the_reference_for_partial_blocks(monkeypatch, caplog):
    calls = _record(monkeypatch)
    T = torch.randint(-1, 2, (16, 576))
    alpha, mu = torch.rand(16, 5) + 0.5, torch.randn(16, 5) * 0.1
    x = torch.randn(2, 576)
    with caplog.at_level("WARNING"):
        y = dispatch.ternary_linear_triton(x, pack_ternary(T), alpha, mu)
    assert calls == [] and "multiple of 128" in caplog.text
    torch.testing.assert_close(y, ternary_linear_reference(x, pack_ternary(T), alpha, mu))


def test_split_heuristics():
    assert dispatch.gemv_split(1, 4096, 32, 132) == 1  # 512 programs already
    assert dispatch.gemv_split(1, 256, 32, 132) > 1
    assert dispatch.gemm_split(16, 4096, 32, 132) > 1
    assert dispatch.gemm_split(2048, 4096, 32, 132) == 1


@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (1, torch.bfloat16), (2, torch.bfloat16),
                                     (4, torch.bfloat16), (8, torch.float32)])
def test_dispatcher_reads_strided_bias_and_perm_by_value(m, dtype):
    # every small-M path (gemv, half2, packed rows, imma, GEMM with its in-kernel gather) indexes
    # bias and perm with unit stride; a column of a matrix used to be read at the wrong elements
    packed, alpha, mu, b, p = _layer(32, 256, 13, bias=True, perm=True)
    b_strided, p_strided = torch.stack([b, -b], 1)[:, 0], torch.stack([p, p.flip(0)], 1)[:, 0]
    assert not b_strided.is_contiguous() and not p_strided.is_contiguous()
    x = torch.randn(m, 256).to(dtype)
    y = dispatch.ternary_linear_triton(x, packed, alpha, mu, b_strided, p_strided)
    assert torch.equal(y, dispatch.ternary_linear_triton(x, packed, alpha, mu, b, p))
    members = [_layer(48, 256, 14, bias=True), _layer(16, 256, 15, bias=True)]
    strided = [torch.stack([mb[3], mb[3]], 1)[:, 0] for mb in members]
    x1 = torch.randn(1, 256).to(torch.bfloat16)
    outs = dispatch.ternary_linear_group_triton(x1, *map(list, zip(*members)))
    outs_strided = dispatch.ternary_linear_group_triton(x1, [mb[0] for mb in members], [mb[1] for mb in members],
                                                        [mb[2] for mb in members], strided, [None, None])
    assert all(torch.equal(a, c) for a, c in zip(outs, outs_strided))
