"""LowerTernaryLinear: op counts, exact equality with the fake-quantized graph, weights removed."""
import pytest
import torch
from conftest import clone_graph, make_tiny_llama, ternarized_graph

from pt2pass import LowerTernaryLinear, PassManager, TernaryConfig, capture, store_of
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
