"""InsertPermutations / FoldPermutations: outputs unchanged (float64), op counts as promised."""
import pytest
import torch
from conftest import clone_graph, make_tiny_llama, ternarized_graph

from pt2pass import (FoldPermutations, InsertPermutations, LowerTernaryLinear, PassManager,
                     store_of)
from pt2pass.capture import WEIGHT_FQN
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


@pytest.mark.parametrize("quantizer", ["sequential", "rtn"])
def test_quantizing_after_the_permutation_passes_is_refused(gm, quantizer):
    # the new quantization would describe already permuted weights, which lowering permutes again
    from pt2pass import CompileConfig, PassError, SequentialTernarize, TernarizeWeights, TernaryConfig
    from pt2pass.runner import causal_lm_batches

    PassManager([InsertPermutations(), FoldPermutations()])(gm)
    again = (SequentialTernarize(causal_lm_batches(IDS, 2), CompileConfig(seqlen=24), progress=False)
             if quantizer == "sequential" else
             TernarizeWeights(CompileConfig(ternary=TernaryConfig(method="rtn")), progress=False))
    with pytest.raises(PassError, match="SSR permutations were already inserted or folded"):
        PassManager([again])(gm)


def test_passes_refuse_a_graph_pt2pass_did_not_capture():
    # a symbolic_trace graph shares the user's modules: lowering used to delete their parameters
    from pt2pass import CompileConfig, PassError, TernarizeWeights, TernaryConfig

    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    traced = torch.fx.symbolic_trace(mlp)
    for p in (TernarizeWeights(CompileConfig(ternary=TernaryConfig(method="rtn")), progress=False),
              LowerTernaryLinear()):
        with pytest.raises(PassError, match="no Linear nodes tagged by pt2pass.capture"):
            PassManager([p])(traced)
    assert [name for name, _ in mlp.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]


class _BroadcastGate(torch.nn.Module):
    """down(silu(up(x)) * sigmoid(g(x))) with g of one output: broadcast over up's 64 features."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 64, bias=False)
        self.g = torch.nn.Linear(32, 1, bias=False)
        self.down = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)) * torch.sigmoid(self.g(x)))


def test_a_gather_behind_a_broadcast_operand_is_not_folded():
    # folding would permute the rows of g, which has 1 row for 64 permuted features
    import pt2pass
    from conftest import dequantized_copy
    from pt2pass import CompileConfig, TernaryConfig

    torch.manual_seed(0)
    model = _BroadcastGate().eval()
    qm = pt2pass.compile(model, torch.randn(64, 32), config=CompileConfig(skip=(), ternary=TernaryConfig(block_size=16)),
                         progress=False, example_inputs=(torch.randn(2, 32),))
    x = torch.randn(5, 32)
    with torch.no_grad():
        y, ref = qm(x), dequantized_copy(model, qm, 16)(x)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    # down's permutation stayed a gather, fused into its op
    down = [n for n in qm.gm.graph.nodes if n.target is TERNARY_OP and n.meta.get(WEIGHT_FQN) == "down.weight"]
    assert qm.store["down.weight"].perm is not None and down[0].args[5] is not None
