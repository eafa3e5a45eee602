"""LowerDecodeAttention on the decode graph of a tiny LLaMA: every SDPA node becomes one
pt2pass.attention node, the graph computes exactly what it computed (on CPU the op is SDPA), and
the exported decode program with the op generates the same tokens after save / load."""
import pytest
import torch

import pt2pass
from pt2pass.decode import CachedDecoder, build_decode_graph, generate_with_program
from pt2pass.lowering.lower_attention import ATTENTION_OP, SDPA, LowerDecodeAttention

N_LAYERS = 2


@pytest.fixture(scope="module")
def qm():
    from conftest import make_tiny_llama

    ternary = pt2pass.TernaryConfig(method="rtn", aga=False, compensation="none", order="natural")
    return pt2pass.compile(make_tiny_llama(), None, config=pt2pass.CompileConfig(ternary=ternary), progress=False)


def _count(graph, target):
    return sum(n.target is target for n in graph.nodes)


def _graph(qm, decode_attention=None):
    return build_decode_graph(qm.skeleton, qm.store, 2, 40, decode_attention=decode_attention)


def test_every_sdpa_node_becomes_one_attention_node(qm):
    before = _graph(qm, decode_attention=False)
    assert (_count(before.graph, SDPA), _count(before.graph, ATTENTION_OP)) == (N_LAYERS, 0)
    after = _graph(qm, decode_attention=True)
    assert (_count(after.graph, SDPA), _count(after.graph, ATTENTION_OP)) == (0, N_LAYERS)


def test_grouped_query_attention_reads_the_cache_not_a_repeated_copy(qm):
    """The tiny LLaMA has 4 query and 2 KV heads: HF's repeat_kv (unsqueeze, expand, reshape) goes."""
    before = _graph(qm, decode_attention=False)
    after = _graph(qm, decode_attention=True)
    nodes = [n for n in after.graph.nodes if n.target is ATTENTION_OP]
    assert all(n.args[5] is True for n in nodes)
    assert all(tuple(n.args[i].meta["val"].shape) == (2, 2, 40, 32) for n in nodes for i in (1, 2))
    expands = [sum(n.target is torch.ops.aten.expand.default for n in g.graph.nodes) for g in (before, after)]
    assert expands[0] - expands[1] == 2 * N_LAYERS  # one for keys, one for values per layer


def test_the_lowered_decode_graph_computes_exactly_the_same(qm):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    steps = [_graph(qm, decode_attention=flag) for flag in (False, True)]
    prefill = [s(ids, torch.arange(9)) for s in steps]
    assert torch.equal(prefill[0], prefill[1])
    token = prefill[0][:, -1].argmax(-1, keepdim=True)
    decode = [s(token, torch.tensor([9])) for s in steps]
    assert torch.equal(decode[0], decode[1])
    tokens = [CachedDecoder(_graph(qm, decode_attention=flag)).generate(ids, 12) for flag in (False, True)]
    assert torch.equal(tokens[0], tokens[1])


def test_on_by_default_and_the_environment_switches_it_off_also_for_generate(qm, monkeypatch):
    monkeypatch.delenv("PT2PASS_DECODE_ATTENTION", raising=False)
    assert _count(_graph(qm).graph, ATTENTION_OP) == N_LAYERS
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    with_op = qm.generate(ids, 8)
    monkeypatch.setenv("PT2PASS_DECODE_ATTENTION", "0")
    assert _count(_graph(qm).graph, ATTENTION_OP) == 0
    assert torch.equal(qm.generate(ids, 8), with_op)  # a graph of its own, not the one built before
    steps = [d.step for key, d in qm._decoders.items() if key[0] == 1]
    assert sorted(_count(s.graph, ATTENTION_OP) for s in steps) == [0, N_LAYERS]


def test_a_bad_setting_is_named(qm, monkeypatch):
    monkeypatch.setenv("PT2PASS_DECODE_ATTENTION", "yes")
    with pytest.raises(ValueError, match="PT2PASS_DECODE_ATTENTION='yes'"):
        _graph(qm)


def test_dropout_and_causal_nodes_are_left_alone():
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return a + torch.nn.functional.scaled_dot_product_attention(q, k, v)

    x = torch.randn(1, 2, 4, 8)
    gm = torch.export.export(Attend(), (x, x, x)).module()
    lower = LowerDecodeAttention()
    out = pt2pass.PassManager([lower])(gm)
    assert (lower.rewritten, lower.kept) == (1, 1)
    assert (_count(out.graph, SDPA), _count(out.graph, ATTENTION_OP)) == (1, 1)
    assert torch.equal(out(x, x, x), Attend()(x, x, x))


def test_exported_decode_program_with_the_op_round_trips(qm, monkeypatch, tmp_path):
    monkeypatch.delenv("PT2PASS_DECODE_ATTENTION", raising=False)  # the default
    ep = pt2pass.export(qm, graph="decode", batch_size=2, max_cache_len=40)
    assert _count(ep.graph, ATTENTION_OP) == N_LAYERS and _count(ep.graph, SDPA) == 0
    path = tmp_path / "decode.pt2"
    torch.export.save(ep, str(path))
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    want = CachedDecoder(_graph(qm, decode_attention=False)).generate(ids, 10)
    assert torch.equal(generate_with_program(torch.export.load(str(path)), ids, 10), want)
