"""pt2pass.sizes: the bits/weight figures, from the shapes alone."""
import torch

from pt2pass.config import TernaryConfig
from pt2pass.passes.layer_quantizer import quantize_linear
from pt2pass.sizes import bits_per_weight
from pt2pass.store import QuantStore


def _store(config):
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    X = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    layer, _ = quantize_linear("l.weight", W, 2 / 512 * X.T @ X, config)
    return QuantStore(layers={"l.weight": layer})


def test_gptq_counts_codes_scale_zero_and_its_act_order_permutation():
    n, k, groups = 64, 256, 2
    nominal = (n * k * 3 + (16 + 3) * n * groups) / (n * k)  # 3-bit codes, fp16 scale, 3-bit zero
    assert bits_per_weight(_store(TernaryConfig(method="gptq", bits=3))) == nominal
    act = _store(TernaryConfig(method="gptq", bits=3, order="act_order"))
    assert bits_per_weight(act) == nominal + 32 * k / (n * k)  # int32 indices in the graph
    assert bits_per_weight(act, "trit5") == nominal + 8 * k / (n * k)  # 8-bit indices saved


def test_a_graph_without_ternary_linears_is_described_as_such():
    from pt2pass.sizes import LinearSizes

    assert LinearSizes(0, 0, 0, 0).describe() == ("no ternary Linears in the graph (the quantized "
                                                  "weights run dense)")
