"""The grouped GEMV (one launch for the Linears that read the same x) under the Triton
interpreter, against the float64 reference of each member and against the ungrouped kernel."""
import pytest
import torch
from conftest import random_ternary_layer_cpu, rel_err

from pt2pass.lowering.kernels.common import INTERPRET
from pt2pass.lowering.kernels.gemv_dp2a import quantize_x, ternary_gemv_dp2a
from pt2pass.lowering.kernels.gemv_group import quantize_x_group, ternary_gemv_group
from pt2pass.lowering.reference import ternary_linear_reference

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def _members(sizes, k, dtype, bias, perm):
    return [random_ternary_layer_cpu(n, k, 10 + i, bias, perm, dtype) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes,k,dtype,bias,perm", [
    ((48, 16, 16), 256, torch.bfloat16, False, True),   # GQA-like: q wider than k and v
    ((40, 24), 128, torch.float16, True, False),        # gate/up, rows not a multiple of BN
    ((16, 16, 8), 384, torch.float16, True, True),
    ((17, 1, 33), 128, torch.bfloat16, True, True),     # every member ends mid-program
])
def test_group_matches_each_member_reference(sizes, k, dtype, bias, perm):
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    members = _members(sizes, k, dtype, bias, perm)
    outs = ternary_gemv_group(x, *map(list, zip(*members)))
    assert [tuple(y.shape) for y in outs] == [(1, n) for n in sizes]
    for y, (packed, alpha, mu, b, p) in zip(outs, members):
        ref = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double(),
                                       None if b is None else b.double(), p)
        assert y.dtype == dtype and rel_err(y, ref) < TOL[dtype]


def test_group_equals_the_ungrouped_dp2a_gemv_bit_for_bit():
    """Same quantization, same loop, same config: grouping only changes which program runs a row."""
    k, dtype = 256, torch.bfloat16
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    members = _members((32, 16), k, dtype, True, True)
    outs = ternary_gemv_group(x, *map(list, zip(*members)))
    for y, (packed, alpha, mu, b, p) in zip(outs, members):
        single = torch.empty_like(y)
        ternary_gemv_dp2a(x, packed, alpha, mu, b, p, single)
        assert torch.equal(y, single)


@pytest.mark.parametrize("config", [None, {"BN": 8, "NBT": 2, "STAGES": 3}])
def test_group_tma_streaming_equals_plain_loads_bit_for_bit(config):
    """Each program builds the descriptor of its own member's weight."""
    k, dtype = 512, torch.float16
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    members = _members((24, 9, 40), k, dtype, True, True)
    got = [ternary_gemv_group(x, *map(list, zip(*members)), config=config, tma=tma) for tma in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(*got))


def test_group_quantization_is_the_single_one_per_permutation():
    k = 256
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, k, generator=g).to(torch.float16)
    perms = [torch.randperm(k, generator=g) for _ in range(3)]
    grouped = quantize_x_group(x, perms)
    assert len(grouped) == 4
    for i, p in enumerate(perms):
        assert all(torch.equal(g[i], one[0]) for g, one in zip(grouped, quantize_x(x, p)))


def _drop(i):
    return lambda packed, alpha, mu, bias, perm: bias.__setitem__(i, None)


def _retype(field, i, dtype):
    return lambda *lists: lists[field].__setitem__(i, lists[field][i].to(dtype))


@pytest.mark.parametrize("bad, message", [
    (dict(rows=2), "one bf16/fp16 row"),
    (dict(dtype=torch.float32), "one bf16/fp16 row"),
    (dict(members=1), "2 to 3 members"),
    (dict(members=4), "2 to 3 members"),
    (dict(edit=_drop(1)), "every member's bias present with one dtype"),
    (dict(edit=_retype(4, 0, torch.int32)), "every member's perm present with one dtype"),
    (dict(edit=_retype(3, 0, torch.float16)), "every member's bias present with one dtype"),
    (dict(edit=_retype(1, 1, torch.float16)), "one dtype for every member's alpha and mu"),
])
def test_group_rejects_what_it_does_not_cover(bad, message):
    """Mixed members would silently use member 0's bias / permutation flags: rejected instead
    (the dispatcher runs such groups one member at a time)."""
    k = 128
    x = torch.randn(bad.get("rows", 1), k).to(bad.get("dtype", torch.bfloat16))
    lists = list(map(list, zip(*_members((16,) * bad.get("members", 2), k, torch.bfloat16, True, True))))
    bad.get("edit", lambda *a: None)(*lists)
    with pytest.raises(ValueError, match=message):
        ternary_gemv_group(x, *lists)


def test_dispatcher_groups_one_half_precision_row_and_runs_members_otherwise(monkeypatch):
    from pt2pass.lowering.kernels import dispatch

    calls = []
    for name in ("ternary_gemv_group", "ternary_linear_triton"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    k = 256

    def run(lead, dtype, sizes=(16, 8), biased=(), scale_dtypes=None):
        members = [random_ternary_layer_cpu(n, k, 20 + i, i in biased, True,
                                            scale_dtypes[i] if scale_dtypes else dtype)
                   for i, n in enumerate(sizes)]
        x = torch.randn(*lead, k).to(dtype)
        calls.clear()
        outs = dispatch.ternary_linear_group_triton(x, *map(list, zip(*members)))
        assert [tuple(y.shape) for y in outs] == [(*lead, n) for n in sizes]
        return list(calls)

    assert run((1, 1), torch.bfloat16) == ["ternary_gemv_group"]  # 3-D x with one row
    assert run((1,), torch.float16, sizes=(16, 8, 8)) == ["ternary_gemv_group"]
    members = ["ternary_linear_triton"] * 2
    assert run((2,), torch.bfloat16) == members                          # two rows
    assert run((1,), torch.float32) == members                           # the fp32 GEMV
    assert run((1,), torch.bfloat16, biased=(0,)) == members             # bias in one member only
    assert run((1,), torch.bfloat16, biased=(0, 1)) == ["ternary_gemv_group"]
    assert run((1,), torch.bfloat16, scale_dtypes=(torch.float16, torch.bfloat16)) == members
    assert run((1,), torch.bfloat16, sizes=(8,) * 4) == ["ternary_linear_triton"] * 4  # > 3 members
