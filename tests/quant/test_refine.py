"""T refinement (beyond the paper): never worse than ITF + AGA, and better on correlated inputs."""
import pytest
import torch

from pt2pass.config import TernaryConfig
from pt2pass.quant import aga, dequant, itf, ternarize_weight
from pt2pass.quant.refine import block_cost, refine_block, sweep

from .utils import correlated_inputs, gaussian_weight, hessian_of


@pytest.fixture(scope="module")
def problem():
    X = correlated_inputs(2048, 256, seed=3)
    return gaussian_weight(96, 256, seed=4, dtype=torch.float64), hessian_of(X)


def test_sweep_with_identity_metric_is_plain_rounding():
    W = gaussian_weight(16, 128, dtype=torch.float64)
    r = itf(W)
    T = sweep(W, r.alpha, r.mu, torch.eye(128, dtype=torch.float64))
    # U = I spreads no error: the sweep reduces to rounding to the nearest grid level
    assert torch.equal(T, r.T)


def test_refine_block_lowers_compensated_cost(problem):
    W, H = problem
    WB = W[:, :128]
    Hinv_BB = torch.linalg.inv(H + 0.01 * H.diagonal().mean() * torch.eye(256, dtype=H.dtype))[:128, :128]
    C = torch.linalg.inv(Hinv_BB)
    r = itf(WB)
    a, m = aga(WB, r.T, C)
    base = block_cost(WB, dequant(r.T, a, m), C)
    T, a2, m2, kept = refine_block(WB, r.T, a, m, Hinv_BB, rounds=3)
    cost = block_cost(WB, dequant(T, a2, m2), C)
    assert kept >= 1 and cost < 0.8 * base
    assert set(T.unique().tolist()) <= {-1, 0, 1} and bool((a2 >= 0).all())


def test_refined_layer_output_error_below_paper_pipeline(problem):
    W, H = problem
    paper = ternarize_weight(W.float(), H.float(), TernaryConfig(order="natural"))
    refined = ternarize_weight(W.float(), H.float(), TernaryConfig(order="natural", refine_rounds=2))
    assert refined.stats["E_x"] < 0.9 * paper.stats["E_x"]
    assert refined.stats["refine_rounds"] >= 1


def test_refine_needs_exact_compensation():
    with pytest.raises(ValueError, match="refine_rounds=2 needs compensation='exact'"):
        TernaryConfig(refine_rounds=2, compensation="none")
    with pytest.raises(ValueError, match="refine_rounds=-1 must be an integer >= 0"):
        TernaryConfig(refine_rounds=-1)
