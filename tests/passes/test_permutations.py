"""InsertPermutations / FoldPermutations: outputs unchanged (float64), op counts as promised."""
import pytest
import torch
from conftest import clone_graph, make_tiny_llama, ternarized_graph

from pt2pass import (FoldPermutations, InsertPermutations, LowerTernaryLinear, PassManager,
                     store_of)
from pt2pass.lowering.lower import TERNARY_OP
from pt2pass.passes.insert_permutations import INDEX_SELECT


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


@pytest.fixture(scope="module")
def ssr_graph():
    gm = ternarized_graph(make_tiny_llama(hidden_size=256, intermediate_size=512).double())
    assert all(store_of(gm)[f].perm is not None for f in store_of(gm))  # default order: SSR
    return gm


@pytest.fixture
def gm(ssr_graph):
    return clone_graph(ssr_graph)


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(gm):
    with torch.no_grad():
        return gm(input_ids=IDS, use_cache=False).logits


def test_insert_adds_one_gather_per_input_and_permutation(gm):
    before = _logits(gm)
    assert before.dtype == torch.float64
    PassManager([InsertPermutations()])(gm)
    # per block: q, k, v (3 different permutations of one input), o, gate, up, down
    assert _count(gm, INDEX_SELECT) == 2 * 7
    torch.testing.assert_close(_logits(gm), before, rtol=1e-12, atol=1e-12)


def test_linears_sharing_input_and_permutation_share_one_gather(gm):
    store = store_of(gm)
    prefix = "model.layers.0.self_attn."
    shared = store[prefix + "q_proj.weight"].perm
    for name in ("k_proj", "v_proj"):
        store[prefix + name + ".weight"].perm = shared.clone()
    PassManager([InsertPermutations()])(gm)
    assert _count(gm, INDEX_SELECT) == 2 * 7 - 2


def test_fold_removes_down_proj_gathers_and_keeps_outputs(gm):
    before = _logits(gm)
    fold = FoldPermutations()
    PassManager([InsertPermutations(), fold])(gm)
    assert fold.folded == 2  # one down_proj per block
    assert _count(gm, INDEX_SELECT) == 2 * 7 - 2
    assert not any("down_proj" in fqn for fqn, _ in fold.remaining)
    reasons = dict(fold.remaining)
    assert "cannot absorb" in reasons["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(_logits(gm), before, rtol=1e-12, atol=1e-12)


def test_lowering_after_fold_is_exact_and_fuses_private_gathers(gm):
    before = _logits(gm)
    PassManager([InsertPermutations(), FoldPermutations(), LowerTernaryLinear()])(gm)
    assert _count(gm, TERNARY_OP) == 14
    # private gathers (o, gate, up) are fused into the op; q/k/v have distinct perms: also private
    assert _count(gm, INDEX_SELECT) == 0
    permuted_in_op = [n for n in gm.graph.nodes if n.target is TERNARY_OP and n.args[5] is not None]
    assert len(permuted_in_op) == 2 * 6  # all but down_proj, whose permutation was folded away
    torch.testing.assert_close(_logits(gm), before, rtol=1e-10, atol=1e-10)
