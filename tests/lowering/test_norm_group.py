"""Residual add + RMSNorm inside the grouped GEMV's x quantization (kernels/norm_group.py) under the
Triton interpreter, against the plain-torch add, norm and member references."""
import pytest
import torch
from conftest import random_ternary_layer_cpu, rel_err

from pt2pass.lowering.kernels.common import INTERPRET
from pt2pass.lowering.kernels.gemv_group import ternary_gemv_group
from pt2pass.lowering.kernels.norm_group import ternary_gemv_group_add_norm
from pt2pass.lowering.reference import rms_norm_reference, ternary_linear_reference

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")


def _inputs(k, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(1, k, generator=g) * scale).to(dtype)
    b = (torch.randn(1, k, generator=g) * scale).to(dtype)
    w = (1 + 0.3 * torch.randn(k, generator=g)).to(dtype)
    return a, b, w


@pytest.mark.parametrize("sizes,k,dtype,bias,perm", [
    ((48, 16, 16), 256, torch.bfloat16, False, True),   # q/k/v with SSR permutations
    ((40, 24), 384, torch.float16, True, False),        # gate/up, no permutation
    ((17, 1, 33), 128, torch.bfloat16, True, True),
])
def test_add_norm_group_matches_the_unfused_computation(sizes, k, dtype, bias, perm):
    a, b, w = _inputs(k, dtype, scale=40.0)  # far from 1: the norm's factor must be applied
    members = [random_ternary_layer_cpu(n, k, 20 + i, bias, perm, dtype) for i, n in enumerate(sizes)]
    h, *ys = ternary_gemv_group_add_norm(a, b, w, 1e-5, *map(list, zip(*members)))
    assert torch.equal(h, a + b)  # the residual stream is exact
    x = rms_norm_reference(h.double(), w.double(), 1e-5)
    for y, (packed, alpha, mu, bb, p) in zip(ys, members):
        ref = ternary_linear_reference(x, packed, alpha.double(), mu.double(), None if bb is None else bb.double(), p)
        assert y.dtype == dtype and y.shape == (1, packed.shape[0])
        assert rel_err(y, ref) < 1.5e-2
    # the same as quantizing the unfused x, up to x's rounding to bf16 / fp16 there
    unfused = ternary_gemv_group(rms_norm_reference(a + b, w, 1e-5), *map(list, zip(*members)))
    assert all(rel_err(y, u.double()) < 1.5e-2 for y, u in zip(ys, unfused))


def test_add_norm_group_keeps_nan_and_rejects_mismatched_inputs():
    k, dtype = 256, torch.bfloat16
    a, b, w = _inputs(k, dtype, seed=1)
    members = [random_ternary_layer_cpu(16, k, 30 + i, False, False, dtype) for i in range(2)]
    a_nan = a.clone()
    a_nan[0, 7] = float("nan")
    h, *ys = ternary_gemv_group_add_norm(a_nan, b, w, 1e-6, *map(list, zip(*members)))
    assert torch.isnan(h[0, 7]) and all(torch.isnan(y).all() for y in ys)  # a NaN anywhere poisons the norm
    with pytest.raises(ValueError, match="weight"):
        ternary_gemv_group_add_norm(a, b, w.float(), 1e-6, *map(list, zip(*members)))
    with pytest.raises(ValueError, match="b like a"):
        ternary_gemv_group_add_norm(a, b[:, :128], w, 1e-6, *map(list, zip(*members)))


def test_dispatcher_fuses_one_row_and_falls_back_to_torch_otherwise(monkeypatch):
    """The op's GPU body (kernels/dispatch.py) on CPU tensors under the interpreter: one bf16 row
    with the norm weight in its dtype runs the fused launch; more rows, or a float32 norm weight,
    add and normalize in torch and call the group path; every case gives the unfused values."""
    from pt2pass.lowering.kernels import dispatch

    calls = []
    for name in ("ternary_gemv_group_add_norm", "ternary_linear_group_triton"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    k, dtype = 256, torch.bfloat16
    members = [random_ternary_layer_cpu(n, k, 40 + i, True, True, dtype) for i, n in enumerate((32, 16))]
    lists = list(map(list, zip(*members)))
    for lead, w_dtype, expected in (((1, 1), dtype, "ternary_gemv_group_add_norm"),
                                    ((3,), dtype, "ternary_linear_group_triton"),
                                    ((1,), torch.float32, "ternary_linear_group_triton")):
        a, b = (torch.randn(*lead, k, generator=torch.Generator().manual_seed(s)).to(dtype) for s in (5, 6))
        w = (torch.rand(k, generator=torch.Generator().manual_seed(7)) + 0.5).to(w_dtype)
        calls.clear()
        h, *ys = dispatch.add_rms_norm_group_triton(a, b, w, 1e-6, *lists)
        assert calls[0] == expected and torch.equal(h, a + b)
        refs = torch.ops.pt2pass.ternary_linear_group(rms_norm_reference(a + b, w, 1e-6), *lists)  # CPU: reference
        assert all(y.shape == r.shape and y.dtype == r.dtype and rel_err(y, r.double()) < 1.5e-2
                   for y, r in zip(ys, refs))
