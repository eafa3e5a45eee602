"""FuseAddRMSNorm on decode graphs: every residual add + LLaMA RMSNorm feeding a grouped ternary
Linear becomes one pt2pass.add_rms_norm_linear_group node, the graph computes exactly what it
computed (on CPU the op runs the same ops), other norms are left alone, and the op passes opcheck."""
import pytest
import torch

import pt2pass
from pt2pass.decode import CachedDecoder, build_decode_graph
from pt2pass.lowering.fuse_add_rms_norm import FUSED_OP, FuseAddRMSNorm
from pt2pass.lowering.group_siblings import GROUP_OP, count_ternary_linears, describe_ternary_ops
from pt2pass.pass_manager import PassManager

N_LAYERS = 2
RSQRT = torch.ops.aten.rsqrt.default
RTN = pt2pass.TernaryConfig(method="rtn", aga=False, compensation="none", order="natural")


def _qm(model):
    return pt2pass.compile(model, None, config=pt2pass.CompileConfig(ternary=RTN), progress=False)


@pytest.fixture(scope="module")
def qm():
    from conftest import make_tiny_llama

    return _qm(make_tiny_llama().to(torch.bfloat16))


def _count(gm, target):
    return sum(n.target is target for n in gm.graph.nodes)


def _graph(qm, monkeypatch, fuse: str, batch=1):
    monkeypatch.setenv("PT2PASS_FUSE_NORM", fuse)
    return build_decode_graph(qm.skeleton, qm.store, batch, 40)


def test_each_add_and_norm_before_a_group_becomes_one_node(qm, monkeypatch):
    before, after = _graph(qm, monkeypatch, "0"), _graph(qm, monkeypatch, "1")
    groups = 2 * N_LAYERS  # q/k/v and gate/up per layer
    assert (_count(before, GROUP_OP), _count(before, FUSED_OP), _count(before, RSQRT)) == (groups, 0, groups + 1)
    # layer 0's first norm reads the embedding (no add) and the final norm feeds the bf16 lm_head
    fused = groups - 1
    assert (_count(after, GROUP_OP), _count(after, FUSED_OP), _count(after, RSQRT)) == (1, fused, 2)
    adds = [sum(n.target is torch.ops.aten.add.Tensor for n in g.graph.nodes) for g in (before, after)]
    assert adds[0] - adds[1] == 2 * fused  # the residual add and the norm's + eps
    again = PassManager([FuseAddRMSNorm()])(after)
    assert _count(again, FUSED_OP) == fused  # idempotent: nothing left to match
    assert count_ternary_linears(after.graph) == count_ternary_linears(before.graph) == 7 * N_LAYERS
    assert describe_ternary_ops(after.graph) == (
        "14 ternary Linears: 4 pt2pass.ternary_linear nodes, 1 pt2pass.ternary_linear_group nodes, "
        "3 pt2pass.add_rms_norm_linear_group nodes")


@pytest.mark.parametrize("batch", [1, 2])
def test_the_fused_decode_graph_computes_exactly_the_same(qm, monkeypatch, batch):
    steps = [_graph(qm, monkeypatch, fuse, batch) for fuse in ("0", "1")]
    ids = torch.randint(0, 256, (batch, 9), generator=torch.Generator().manual_seed(1))
    prefill = [s(ids, torch.arange(9)) for s in steps]
    assert torch.equal(prefill[0], prefill[1])
    token = prefill[0][:, -1].argmax(-1, keepdim=True)
    decode = [s(token, torch.tensor([9])) for s in steps]
    assert torch.equal(decode[0], decode[1])
    tokens = [CachedDecoder(s).generate(ids, 10) for s in [_graph(qm, monkeypatch, f, batch) for f in ("0", "1")]]
    assert torch.equal(tokens[0], tokens[1])


def test_other_norms_are_left_alone(monkeypatch):
    """Gemma's RMSNorm (float32 weight multiply, 1 + w) is not LLaMA's: no node matches."""
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=128)
    torch.manual_seed(0)
    qm = _qm(GemmaForCausalLM(cfg).eval())
    gm = _graph(qm, monkeypatch, "1")
    assert _count(gm, GROUP_OP) == 2 * N_LAYERS and _count(gm, FUSED_OP) == 0


def test_a_norm_output_read_elsewhere_is_not_fused(qm, monkeypatch):
    gm = _graph(qm, monkeypatch, "0")
    group = [n for n in gm.graph.nodes if n.target is GROUP_OP][-1]  # the last layer's gate/up
    with gm.graph.inserting_after(group):  # a second reader of its normalized x (the pass runs
        gm.graph.call_function(torch.ops.aten.neg.default, (group.args[0],))  # before dead code goes)
    fuse = FuseAddRMSNorm()
    PassManager([fuse])(gm)
    assert fuse.fused == 2 * N_LAYERS - 2  # all but that one and layer 0's first


def test_a_bad_setting_is_named(qm, monkeypatch):
    with pytest.raises(ValueError, match="PT2PASS_FUSE_NORM='on'"):
        _graph(qm, monkeypatch, "on")


@pytest.mark.parametrize("with_extras", [False, True])
def test_opcheck(with_extras):
    from test_ops import _layer

    members = [_layer(48, 256, 5), _layer(16, 256, 6)]
    packed, alpha, mu, bias, perm = map(list, zip(*members))
    if not with_extras:
        bias, perm = [None, None], [None, None]
    a, b = torch.randn(2, 3, 256), torch.randn(2, 3, 256)
    w = torch.rand(256) + 0.5
    torch.library.opcheck(FUSED_OP, (a, b, w, 1e-5, packed, alpha, mu, bias, perm))
    h, *ys = FUSED_OP(a, b, w, 1e-5, packed, alpha, mu, bias, perm)
    assert torch.equal(h, a + b)
    x = w * ((a + b) * torch.rsqrt((a + b).pow(2).mean(-1, keepdim=True) + 1e-5))
    group = torch.ops.pt2pass.ternary_linear_group(x, packed, alpha, mu, bias, perm)
    assert all(torch.equal(y, g) for y, g in zip(ys, group))  # float32: the same ops


def test_members_with_ssr_permutations_are_fused_and_exact(monkeypatch):
    """PT²-LLM with SSR: every q/k/v and gate/up member gathers x through its own permutation.
    (bf16: in a float32 model h.to(float32) is h itself, and the export lets the next residual add
    read the cast node, which then has a reader outside the pattern: not fused, by design.)"""
    from conftest import make_tiny_llama

    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    config = pt2pass.CompileConfig(seqlen=32, batch_size=4, ternary=pt2pass.TernaryConfig(itf_max_iters=2))
    model = make_tiny_llama(hidden_size=256, intermediate_size=512).to(torch.bfloat16)
    qm = pt2pass.compile(model, calib, config=config, progress=False)
    before, after = _graph(qm, monkeypatch, "0"), _graph(qm, monkeypatch, "1")
    fused = [n for n in after.graph.nodes if n.target is FUSED_OP]
    assert len(fused) == 2 * N_LAYERS - 1 and all(None not in n.args[8] for n in fused)  # perm lists
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    assert torch.equal(before(ids, torch.arange(7)), after(ids, torch.arange(7)))
