"""GroupSiblingLinears: op counts, bit-identical outputs, shared buffers, what is not grouped."""
import operator

import pytest
import torch
from conftest import make_tiny_llama, ternarized_graph

from pt2pass import LowerTernaryLinear, PassManager, TernaryConfig
from pt2pass.lowering.group_siblings import (GROUP_OP, MAX_GROUP, GroupSiblingLinears,
                                             count_ternary_linears)
from pt2pass.lowering.lower import TERNARY_OP


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


@pytest.fixture(scope="module")
def lowered():
    """The tiny LLaMA 2 blocks wide (GQA: k/v narrower than q) with SSR: every Linear permuted."""
    model = make_tiny_llama(hidden_size=256, intermediate_size=512)
    return PassManager([LowerTernaryLinear()])(ternarized_graph(model, TernaryConfig(itf_max_iters=4)))


def test_qkv_and_gate_up_become_one_group_each_with_identical_logits(lowered):
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = lowered(input_ids=ids, use_cache=False).logits
    buffers = dict(lowered.named_buffers())
    gm = PassManager([GroupSiblingLinears()])(lowered)
    assert _count(gm, TERNARY_OP) == 4 and _count(gm, GROUP_OP) == 4  # o/down single; qkv, gate/up
    assert count_ternary_linears(gm.graph) == 14
    groups = [n for n in gm.graph.nodes if n.target is GROUP_OP]
    assert sorted(len(n.args[1]) for n in groups) == [2, 2, 3, 3]
    qkv = next(n for n in groups if len(n.args[1]) == 3)
    attn = qkv.meta["pt2pass_weight_fqns"][0].rsplit(".", 2)[0]  # model.layers.<i>.self_attn
    assert [a.target for a in qkv.args[1]] == [f"{attn}.{p}_proj.packed" for p in "qkv"]
    assert all(a is not None for a in qkv.args[5])  # every member keeps its own permutation
    assert _count(gm, operator.getitem) >= 10
    assert all(t is buffers[name] for name, t in gm.named_buffers())  # nothing copied
    with torch.no_grad():
        after = gm(input_ids=ids, use_cache=False).logits
    assert torch.equal(after, before)  # CPU: each member runs the same reference


def test_grouping_is_idempotent(lowered):
    gm = PassManager([GroupSiblingLinears()])(lowered)
    pm = PassManager([GroupSiblingLinears()])
    pm(gm)
    assert not pm.history[0].modified


def _siblings(n_members, bias_of=lambda i: True):
    """A graph with n_members ternary_linear nodes reading the same x."""
    from pt2pass.lowering.format import pack_ternary

    class Siblings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(n_members):
                self.register_buffer(f"p{i}", pack_ternary(torch.randint(-1, 2, (8, 128))))
                self.register_buffer(f"a{i}", torch.rand(8, 1))
                self.register_buffer(f"m{i}", torch.rand(8, 1))
                self.register_buffer(f"b{i}", torch.rand(8))

        def forward(self, x):
            return [TERNARY_OP(x, getattr(self, f"p{i}"), getattr(self, f"a{i}"), getattr(self, f"m{i}"),
                               getattr(self, f"b{i}") if bias_of(i) else None, None, 128)
                    for i in range(n_members)]

    return torch.fx.symbolic_trace(Siblings())


def test_groups_hold_at_most_max_group_members():
    from pt2pass.lowering.kernels.gemv_group import MAX_MEMBERS

    assert MAX_GROUP == MAX_MEMBERS
    gm = PassManager([GroupSiblingLinears()])(_siblings(7))
    assert sorted(len(n.args[1]) for n in gm.graph.nodes if n.target is GROUP_OP) == [3, 3]
    assert _count(gm, TERNARY_OP) == 1


def test_members_differing_in_bias_are_not_grouped_together():
    x = torch.randn(2, 128)
    gm = _siblings(4, bias_of=lambda i: i % 2 == 0)
    want = gm(x)
    gm = PassManager([GroupSiblingLinears()])(gm)
    assert sorted(len(n.args[1]) for n in gm.graph.nodes if n.target is GROUP_OP) == [2, 2]
    assert all(torch.equal(a, b) for a, b in zip(gm(x), want))
