import pytest
import torch
from torch import nn

from pt2pass.capture import (LINEAR_OP, STAGE, CaptureError, capture, find_blocks, linear_nodes,
                             stages)


def _linear_fqns(model):
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_tiny_llama_every_linear_mapped_to_its_fqn(tiny_llama):
    gm = capture(tiny_llama)
    mapped = linear_nodes(gm)
    assert set(mapped) == _linear_fqns(tiny_llama)
    assert len(mapped) == 2 * 7 + 1
    for fqn, node in mapped.items():
        assert node.target is LINEAR_OP and node.args[1].target == fqn


def test_tiny_llama_stages_in_order(tiny_llama):
    gm = capture(tiny_llama)
    assert stages(gm) == ["embedding", "model.layers.0", "model.layers.1", "head"]
    by_stage = {}
    for fqn, node in linear_nodes(gm).items():
        by_stage.setdefault(node.meta[STAGE], []).append(fqn.split(".")[-2])
    assert sorted(by_stage["model.layers.1"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert by_stage["head"] == ["lm_head"]


def test_captured_graph_matches_model_at_other_shapes(tiny_llama):
    gm = capture(tiny_llama)
    for shape in [(1, 7), (3, 33)]:
        ids = torch.randint(0, 256, shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(input_ids=ids, use_cache=False).logits,
                                       tiny_llama(input_ids=ids, use_cache=False).logits,
                                       rtol=0, atol=0)


def test_generic_sequential_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    gm = capture(model, (torch.randn(4, 32),))
    assert set(linear_nodes(gm)) == {"0.weight", "2.weight"}
    assert find_blocks(model) == ["0", "2"]
    assert stages(gm) == ["0", "2"]  # the ReLU between the two Linears stays with block "0"
    x = torch.randn(9, 32)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_model_without_linear_is_rejected():
    with pytest.raises(ValueError, match="has no nn.Linear layers"):
        capture(nn.Sequential(nn.ReLU()), (torch.randn(2, 3),))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python branch: not traceable
            return self.proj(x)
        return -self.proj(x)


def test_untraceable_model_names_the_problem():
    with pytest.raises(CaptureError, match="torch.export could not trace _DataDependent"):
        capture(_DataDependent(), (torch.randn(2, 8),))


@pytest.mark.slow
def test_smollm2_all_211_linears_mapped(smollm2):
    model, _ = smollm2
    gm = capture(model)
    mapped = linear_nodes(gm)
    # lm_head is tied to the embedding: its weight FQN is the embedding's parameter
    fqns = _linear_fqns(model)
    assert len(mapped) == 211
    assert set(mapped) - {"lm_head.weight", "model.embed_tokens.weight"} == fqns - {"lm_head.weight"}
    assert len(stages(gm)) == 30 + 2
