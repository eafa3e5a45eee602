"""The split-cache decode attention kernel under the Triton interpreter, against float64 SDPA, and
the pt2pass.attention op around it (opcheck; SDPA itself off the decode path)."""
import pytest
import torch
import torch.nn.functional as F

from pt2pass.bench import attention_case, attention_reference
from pt2pass.lowering.kernels.common import INTERPRET
from pt2pass.lowering.kernels.decode_attention import BLOCK_L, decode_attention, unsupported_reason

ATTENTION = torch.ops.pt2pass.attention
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
kernel_test = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")


def _inputs(b, h, hk, length, d, dtype, valid, kind, seed=0):
    """q (b, h, 1, d), k and v (b, hk, length, d) and a mask letting row i see its first valid[i]
    slots: None, bool or additive (0 / -inf); the hidden slots of k and v hold NaN."""
    return attention_case(b, h, hk, length, valid, d, "cpu", dtype, kind, hidden=float("nan"), seed=seed)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("heads, length, valid, n_split", [
    ((4, 4), 150, [150, 150], None),   # MHA, the last block partial
    ((4, 2), 150, [100, 7], 3),        # GQA; row 1 sees part of its first block only
    ((2, 1), 256, [1, 200], 4),        # one slot; splits that see no slot at all
])
def test_matches_sdpa(dtype, kind, heads, length, valid, n_split):
    h, hk = heads
    if kind == "none":
        valid = [length] * len(valid)
    q, k, v, mask = _inputs(len(valid), h, hk, length, 32, dtype, valid, kind, seed=length)
    out = decode_attention(q, k, v, mask, 0.17, n_split=n_split)
    ref = attention_reference(q, k, v, mask, 0.17)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[dtype]


@kernel_test
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_slots_the_mask_hides_are_never_read(kind):
    """The unwritten end of a static cache, and hidden slots inside a visible block: NaN there
    (not merely masked) leaves the rows finite; False and -inf hide alike."""
    q, k, v, mask = _inputs(1, 2, 2, 4 * BLOCK_L, 16, torch.float32, [BLOCK_L + 3], kind)
    out = decode_attention(q, k, v, mask, 0.25, n_split=4)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), attention_reference(q, k, v, mask, 0.25), atol=1e-5)


@kernel_test
@pytest.mark.parametrize("shape", [(2, 4, 1, 70), (1, 1, 1, 70), (1, 70), (2, 1, 1, 70)])
def test_masks_broadcast_as_in_sdpa(shape):
    """Per head, shared by the batch, 2-D; a mask as the decode graph passes it."""
    q, k, v, _ = _inputs(2, 4, 2, 70, 16, torch.float32, [70, 70], "none", seed=5)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(6)) > 0.3
    mask[..., 0] = True  # every row sees a slot
    out = decode_attention(q, k, v, mask, 0.2)
    assert torch.allclose(out.double(), attention_reference(q, k, v, mask, 0.2), atol=1e-5)


@kernel_test
def test_a_strided_cache_view_and_a_nan_in_an_additive_mask():
    """The first 90 slots of a longer cache (row stride of the full one); a NaN in the mask makes
    its row NaN, as in SDPA, instead of hiding the slot."""
    q, k, v, mask = _inputs(2, 2, 2, 128, 16, torch.float32, [128, 128], "additive", seed=7)
    k, v, mask = k[:, :, :90], v[:, :, :90], mask[..., :90].clone()
    out = decode_attention(q, k, v, mask, 0.3)
    assert torch.allclose(out.double(), attention_reference(q, k, v, mask, 0.3), atol=1e-5)
    mask[1, 0, 0, 4] = float("nan")
    out = decode_attention(q, k, v, mask, 0.3)
    assert out[1].isnan().all() and torch.isfinite(out[0]).all()


@kernel_test
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_a_row_that_sees_nothing_is_zero_as_in_sdpa_and_nan_still_propagates(kind):
    q, k, v, mask = _inputs(3, 2, 2, 80, 16, torch.float32, [0, 80, 80], kind)
    q[2, 0, 0, 3] = float("nan")
    out = decode_attention(q, k, v, mask, 0.25)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(attention_reference(q[:1], k[:1], v[:1], mask[:1], 0.25), torch.zeros_like(out[0:1]).double())
    assert torch.allclose(out[1].double(), attention_reference(q, k, v, mask, 0.25)[1], atol=1e-5)
    assert out[2, 0].isnan().all() and not out[2, 1].isnan().any()


@pytest.mark.parametrize("change, message", [
    (dict(q=(2, 4, 2, 32)), "2 query positions"),
    (dict(q=(2, 4, 1, 48), k=(2, 4, 10, 48)), "head dim 48"),
    (dict(q=(2, 3, 1, 32)), "does not match"),
    (dict(mask=(2, 1, 1, 11)), "does not broadcast"),
    (dict(q=(1, 4, 1, 32), k=(1, 2, 10, 32)), "does not broadcast"),   # would broadcast q up
    (dict(mask=(1, 2, 1, 1, 10)), "does not broadcast"),
    (dict(kdtype=torch.float16), "dtypes"),
    (dict(mdtype=torch.float64), "mask dtype"),                        # SDPA rejects it too
    (dict(k=(2, 2, 0, 32), mask=(2, 1, 1, 0)), "an empty cache"),
])
def test_unsupported_inputs_are_named(change, message):
    shapes = {"q": (2, 4, 1, 32), "k": (2, 2, 10, 32), "mask": (2, 1, 1, 10), **change}
    q = torch.zeros(shapes["q"])
    k = torch.zeros(shapes.get("k"), dtype=change.get("kdtype", torch.float32))
    mask = torch.ones(shapes["mask"], dtype=change.get("mdtype", torch.bool))
    assert message in unsupported_reason(q, k, k, mask)
    with pytest.raises(ValueError, match=message):
        decode_attention(q, k, k, mask, 1.0)


@pytest.mark.parametrize("gqa", [False, True])
def test_the_op_is_sdpa_off_the_gpu_decode_path(gqa):
    q, k, v, mask = _inputs(2, 4, 2 if gqa else 4, 40, 16, torch.float32, [40, 9], "bool")
    k, v = k.nan_to_num(), v.nan_to_num()
    out = ATTENTION(q, k, v, mask, 0.3, gqa)
    rep = 2 if gqa else 1  # the values of HF's repeat_kv, then SDPA: what the graph computed before
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask, scale=0.3)
    assert torch.equal(out, want)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=gqa),
                          atol=1e-6)


def test_opcheck():
    q, k, v, mask = _inputs(1, 4, 2, 24, 16, torch.float32, [24], "bool")
    torch.library.opcheck(ATTENTION, (q, k.nan_to_num(), v.nan_to_num(), mask, None, True))


def test_launch_plan_follows_the_sweep_and_never_leaves_a_split_empty():
    from pt2pass.lowering.kernels.decode_attention import MAX_SPLITS, LaunchPlan, launch_plan

    # the H200 sweep's picks: 7B / 8B at batch 1 (32 pairs), at batch 8 (256 pairs), 512 slots
    assert launch_plan(32, 512, 132) == LaunchPlan(n_split=8, per_split=1, num_warps=4)
    assert launch_plan(256, 512, 132) == LaunchPlan(n_split=3, per_split=3, num_warps=2)
    # 4 warps up to a quarter of a pair per SM
    assert launch_plan(33, 512, 132).num_warps == 4 and launch_plan(34, 512, 132).num_warps == 2
    assert launch_plan(32, 10, 132) == LaunchPlan(1, 1, 4)                 # one block
    assert launch_plan(1, 200, 132, n_split=50) == LaunchPlan(4, 1, 4)     # more splits asked than blocks
    assert launch_plan(100_000, 512, 132) == LaunchPlan(1, 8, 2)           # more pairs than programs wanted
    for pairs in (1, 3, 32, 130, 1000):
        for length in (1, 63, 64, 65, 512, 4097, 131_072):
            plan = launch_plan(pairs, length, 132)
            blocks = -(-length // 64)
            assert 1 <= plan.n_split <= MAX_SPLITS
            assert (plan.n_split - 1) * plan.per_split < blocks <= plan.n_split * plan.per_split, (pairs, length, plan)
