"""GroupSiblingLinears: op counts, bit-identical outputs, shared buffers, what is not grouped."""
import operator

import pytest
import torch
from conftest import clone_graph, make_tiny_llama, ternarized_graph

from pt2pass import LowerTernaryLinear, PassManager, TernaryConfig
from pt2pass.lowering.group_siblings import (GROUP_OP, MAX_GROUP, GroupSiblingLinears,
                                             count_ternary_linears)
from pt2pass.lowering.lower import TERNARY_OP


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


@pytest.fixture(scope="module")
def _lowered_once():
    """The tiny LLaMA 2 blocks wide (GQA: k/v narrower than q) with SSR: every Linear permuted."""
    model = make_tiny_llama(hidden_size=256, intermediate_size=512)
    return PassManager([LowerTernaryLinear()])(ternarized_graph(model, TernaryConfig(itf_max_iters=4)))


@pytest.fixture
def lowered(_lowered_once):
    return clone_graph(_lowered_once)  # the pass rewrites in place


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


class _Layers(torch.nn.Module):
    """n (128 x 128) ternary layers as buffers p<i>, a<i>, m<i>, b<i>; forward set by subclasses."""

    def __init__(self, n):
        super().__init__()
        from pt2pass.lowering.format import pack_ternary

        g = torch.Generator().manual_seed(n)
        for i in range(n):
            self.register_buffer(f"p{i}", pack_ternary(torch.randint(-1, 2, (128, 128), generator=g)))
            self.register_buffer(f"a{i}", torch.rand(128, 1, generator=g) * 0.1)
            self.register_buffer(f"m{i}", torch.rand(128, 1, generator=g) * 0.01)
            self.register_buffer(f"b{i}", torch.rand(128, generator=g))

    def op(self, i, x, bias=True):
        return TERNARY_OP(x, getattr(self, f"p{i}"), getattr(self, f"a{i}"), getattr(self, f"m{i}"),
                          getattr(self, f"b{i}") if bias else None, None, 128)


def _siblings(n_members, bias_of=lambda i: True):
    """A graph with n_members ternary_linear nodes reading the same x."""

    class Siblings(_Layers):
        def forward(self, x):
            return [self.op(i, x, bias_of(i)) for i in range(n_members)]

    return torch.fx.symbolic_trace(Siblings(n_members))


def _grouped_and_same(gm, x):
    """gm after GroupSiblingLinears, checked to compute what it computed before."""
    want = gm(x)
    gm = PassManager([GroupSiblingLinears()])(gm)
    got = gm(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    return gm


def _group_sizes(gm):
    return sorted(len(n.args[1]) for n in gm.graph.nodes if n.target is GROUP_OP)


def test_groups_hold_at_most_max_group_members():
    from pt2pass.lowering.kernels.gemv_group import MAX_MEMBERS

    assert MAX_GROUP == MAX_MEMBERS
    gm = _grouped_and_same(_siblings(7), torch.randn(2, 128))
    assert _group_sizes(gm) == [3, 3] and _count(gm, TERNARY_OP) == 1


def test_members_differing_in_bias_are_not_grouped_together():
    gm = _grouped_and_same(_siblings(4, bias_of=lambda i: i % 2 == 0), torch.randn(2, 128))
    assert _group_sizes(gm) == [2, 2]


def test_a_group_output_feeding_another_group():
    """a, b = group(x); c, d = group(a): the second group's input is the first group's getitem."""

    class Chained(_Layers):
        def forward(self, x):
            a, b = self.op(0, x), self.op(1, x)
            return [self.op(2, a), self.op(3, a), b]

    gm = _grouped_and_same(torch.fx.symbolic_trace(Chained(4)), torch.randn(3, 128))
    assert _group_sizes(gm) == [2, 2] and _count(gm, TERNARY_OP) == 0


def test_a_member_whose_input_comes_after_the_first_member_is_left_alone():
    class LateBias(_Layers):
        def forward(self, x):
            y0 = self.op(0, x)
            late = self.b1 + x.sum() * 0  # a node computed after y0: the group cannot go before y0
            y1 = TERNARY_OP(x, self.p1, self.a1, self.m1, late, None, 128)
            return [y0, y1]

    gm = _grouped_and_same(torch.fx.symbolic_trace(LateBias(2)), torch.randn(2, 128))
    assert _group_sizes(gm) == [] and _count(gm, TERNARY_OP) == 2


def test_nodes_with_keyword_arguments_are_grouped():
    class Keywords(_Layers):
        def forward(self, x):
            return [TERNARY_OP(x, self.p0, self.a0, self.m0, bias=self.b0, perm=None, block_size=128),
                    TERNARY_OP(x=x, packed=self.p1, alpha=self.a1, mu=self.m1, bias=self.b1)]

    gm = _grouped_and_same(torch.fx.symbolic_trace(Keywords(2)), torch.randn(2, 128))
    assert _group_sizes(gm) == [2]
