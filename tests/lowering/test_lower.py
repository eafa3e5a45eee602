"""LowerTernaryLinear: op counts, exact equality with the fake-quantized graph, weights removed."""
import pytest
import torch
from conftest import clone_graph, make_tiny_llama, ternarized_graph

from pt2pass import LowerTernaryLinear, PassError, PassManager, TernaryConfig, capture, store_of
from pt2pass.capture import LINEAR_OP
from pt2pass.lowering.lower import TERNARY_OP


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


@pytest.fixture(scope="module")
def _ternarized_once():
    return ternarized_graph(make_tiny_llama(), TernaryConfig(order="natural"))


@pytest.fixture
def ternarized(_ternarized_once):
    return clone_graph(_ternarized_once)


def test_lowering_replaces_every_ternarized_linear(ternarized):
    gm = ternarized
    assert _count(gm, LINEAR_OP) == 15 and _count(gm, TERNARY_OP) == 0
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        fake_quant = gm(input_ids=ids, use_cache=False).logits
    pm = PassManager([LowerTernaryLinear()])
    gm = pm(gm)
    assert pm.history[0].modified
    assert _count(gm, LINEAR_OP) == 1  # lm_head stays in full precision
    assert _count(gm, TERNARY_OP) == 14
    names = {n for n, _ in gm.named_parameters()}
    assert not any(n.endswith("proj.weight") for n in names)
    assert "model.layers.0.mlp.down_proj.packed" in dict(gm.named_buffers())
    with torch.no_grad():
        lowered = gm(input_ids=ids, use_cache=False).logits
    # same weights (alpha*T+mu rebuilt from the packed codes): equal up to float32 rounding
    torch.testing.assert_close(lowered, fake_quant, rtol=1e-5, atol=1e-5)


def test_lowering_before_any_quantizing_pass_is_refused(tiny_llama):
    # it lowered nothing and returned the full-precision graph as if it had worked
    with pytest.raises(PassError, match=r"LowerTernaryLinear: no Linear has been quantized yet .*run "
                                        r"a quantizing pass \(SequentialTernarize or TernarizeWeights\)"):
        PassManager([LowerTernaryLinear()])(capture(tiny_llama))


def test_lowering_is_idempotent(ternarized):
    gm = PassManager([LowerTernaryLinear()])(ternarized)
    pm = PassManager([LowerTernaryLinear()])
    pm(gm)
    assert not pm.history[0].modified


def test_packed_codes_match_store(ternarized):
    from pt2pass.lowering.format import unpack_ternary

    store = store_of(ternarized)
    gm = PassManager([LowerTernaryLinear()])(ternarized)
    fqn = "model.layers.1.mlp.up_proj.weight"
    packed = dict(gm.named_buffers())["model.layers.1.mlp.up_proj.packed"]
    assert torch.equal(unpack_ternary(packed), store[fqn].T)


def test_shape_mismatch_between_store_and_graph_is_rejected(ternarized, tiny_llama):
    store = store_of(ternarized)
    other = capture(tiny_llama)  # graph whose weights are not the ternarized ones
    fqn = "model.layers.0.self_attn.q_proj.weight"
    bad = store[fqn]
    bad.T = bad.T[:, :64]
    with pytest.raises(Exception, match="does not match the quantized layer"):
        PassManager([LowerTernaryLinear(store)])(other)


class _TwoWeightsOneModule(torch.nn.Module):
    """Two matrices of one module used through F.linear: their lowered buffers must not collide."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(32, 32) / 6)
        self.w2 = torch.nn.Parameter(torch.randn(32, 32) / 6)
        self.head = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.head(torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, self.w1)), self.w2))


@pytest.mark.parametrize("order", ["natural", "ssr"])
def test_weights_sharing_a_module_get_buffers_of_their_own(order, caplog):
    import pt2pass
    from conftest import dequantized_copy
    from pt2pass import CompileConfig

    torch.manual_seed(0)
    model = _TwoWeightsOneModule().eval()
    with caplog.at_level("WARNING", logger="pt2pass.api"):
        qm = pt2pass.compile(model, torch.randn(64, 32), progress=False, example_inputs=(torch.randn(2, 32),),
                             config=CompileConfig(skip=(), ternary=TernaryConfig(block_size=16, order=order)))
    assert "outside nn.Linear" not in caplog.text  # they are quantized: no "stay in full precision"
    buffers = {name for name, _ in qm.gm.named_buffers()}
    assert {"w1_packed", "w2_packed", "head.packed"} <= buffers
    x = torch.randn(5, 32)
    with torch.no_grad():
        y, ref = qm(x), dequantized_copy(model, qm, 16)(x)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_multihead_attention_with_other_key_value_widths_runs():
    # q/k/v_proj_weight of different widths on one module: crashed on the first call before
    import pt2pass
    from pt2pass import CompileConfig

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(32, 2, kdim=48, vdim=48, batch_first=True)

        def forward(self, q, kv):
            return self.mha(q, kv, kv, need_weights=False)[0]

    torch.manual_seed(0)
    model = Attn().eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 48)
    qm = pt2pass.compile(model, None, progress=False, example_inputs=(q, kv),
                         config=CompileConfig(skip=(), ternary=TernaryConfig(method="rtn", block_size=16)))
    assert {"mha.q_proj_weight", "mha.k_proj_weight", "mha.v_proj_weight"} <= set(qm.store.layers)
    from conftest import dequantized_copy

    with torch.no_grad():
        y, ref = qm(q, kv), dequantized_copy(model, qm, 16)(q, kv)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
