"""The blockwise loop ternarize_weight and the exact OBS update (pt2pass/quant/gptq.py)."""
import logging

import pytest
import torch

from pt2pass.config import TernaryConfig
from pt2pass.quant import (aga, canonicalize, dequantize_blocks, itf, next_block, obs_update,
                           output_error, prepare_hessian, ternarize_weight, unpermute)

from .utils import correlated_inputs, gaussian_weight, hessian_of


@pytest.fixture(scope="module")
def problem():
    X = correlated_inputs(1024, 256, seed=21)
    return gaussian_weight(96, 256, seed=22), hessian_of(X).float()


def ls_refit(W, Q, X_or_H, fixed, rest, is_h=False):
    """argmin over W'[:, rest] of ||(W - W') X^T||^2 with W'[:, fixed] = Q[:, fixed] (explicit X
    via lstsq), or the same through H = X^T X in closed form."""
    if is_h:
        H = X_or_H
        D = (W[:, fixed] - Q[:, fixed]) @ H[fixed.unsqueeze(1), rest]
        return W[:, rest] + torch.linalg.solve(H[rest.unsqueeze(1), rest], D.t()).t()
    X = X_or_H
    target = X @ W.t() - X[:, fixed] @ Q[:, fixed].t()
    return torch.linalg.lstsq(X[:, rest], target).solution.t()


def test_obs_update_is_least_squares_refit_for_any_order():
    X = correlated_inputs(400, 24, seed=1)
    W = gaussian_weight(6, 24, seed=2, dtype=torch.float64)
    Q = W + 0.01 * torch.randn(6, 24, dtype=torch.float64)  # any values for the fixed columns
    order = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    B1, B2 = order[:8], order[8:16]
    Hinv = torch.linalg.inv(X.t() @ X)
    # step 1 on all columns (local index = column index)
    R1 = torch.tensor([j for j in range(24) if j not in B1.tolist()])
    W1, Hinv1 = obs_update(W, Hinv, B1, torch.arange(24)[R1], W[:, B1] - Q[:, B1])
    torch.testing.assert_close(W1, ls_refit(W, Q, X, B1, R1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(Hinv1, torch.linalg.inv((X.t() @ X)[R1.unsqueeze(1), R1]))
    # step 2 in the compacted index space of R1
    loc = lambda cols: torch.tensor([R1.tolist().index(c) for c in cols.tolist()])
    R2 = torch.tensor([j for j in R1.tolist() if j not in B2.tolist()])
    W2, _ = obs_update(W1, Hinv1, loc(B2), loc(R2), W1[:, loc(B2)] - Q[:, B2])
    torch.testing.assert_close(W2, ls_refit(W, Q, X, torch.cat([B1, B2]), R2), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("order", ["natural", "act_order", "ssr"])
def test_exact_loop_matches_direct_least_squares_reference(order):
    """Replays the loop: before each block the not-yet-quantized columns must equal the LS refit
    of W given the already-quantized ones (under the damped H), and ITF + AGA on that block must
    reproduce T, alpha and mu; for SSR, next_block on it must pick the same block."""
    X = correlated_inputs(512, 96, seed=4)
    W = gaussian_weight(40, 96, seed=5)
    cfg = TernaryConfig(order=order, block_size=32)
    r = ternarize_weight(W, hessian_of(X).float(), cfg)
    Wd, Hd, _ = prepare_hessian(W, hessian_of(X).float(), cfg.damp)
    perm = r.perm if r.perm is not None else torch.arange(96)
    Q = r.Q.double()
    for b, start in enumerate(range(0, 96, 32)):
        fixed, rest = perm[:start], perm[start:]
        W_rest = ls_refit(Wd, Q, Hd, fixed, rest, is_h=True) if start else Wd[:, rest]
        B = perm[start:start + 32]
        if order == "ssr":
            pick = rest[next_block(W_rest, torch.arange(rest.numel()), 32)]
            assert torch.equal(pick.sort().values, B.sort().values)
        WB = W_rest[:, :32]
        res = itf(WB)
        a, m = aga(WB, res.T, Hd[B.unsqueeze(1), B])
        T, a = canonicalize(res.T, a)
        assert torch.equal(T, r.T[:, start:start + 32])
        torch.testing.assert_close(a.float(), r.alpha[:, b], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m.float(), r.mu[:, b], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("order", ["natural", "act_order"])
def test_diagonal_equals_exact_for_static_orders(problem, order):
    W, H = problem
    ex = ternarize_weight(W, H, TernaryConfig(order=order, compensation="exact", block_size=64))
    dg = ternarize_weight(W, H, TernaryConfig(order=order, compensation="diagonal", block_size=64))
    assert (ex.T == dg.T).double().mean() > 0.999
    assert dg.stats["E_x"] == pytest.approx(ex.stats["E_x"], rel=1e-3)


def test_compensation_lowers_output_error_below_rtn_and_none(problem):
    W, H = problem
    ex = {}
    for name, cfg in {
        "rtn": TernaryConfig(method="rtn", block_size=64),
        "none": TernaryConfig(compensation="none", block_size=64),
        "ssr_exact": TernaryConfig(order="ssr", compensation="exact", block_size=64),
        "ssr_diag": TernaryConfig(order="ssr", compensation="diagonal", block_size=64),
        "act_exact": TernaryConfig(order="act_order", compensation="exact", block_size=64),
    }.items():
        r = ternarize_weight(W, H, cfg)
        ex[name] = output_error(W, r.Q, H)
        assert r.stats.get("E_x", ex[name]) == pytest.approx(ex[name], rel=1e-9)
    # measured: rtn 169, none 137, ssr_diag 134, ssr_exact 98, act_exact 77
    assert ex["none"] < 0.9 * ex["rtn"]
    assert ex["ssr_exact"] < 0.8 * ex["none"]
    assert ex["act_exact"] < 0.8 * ex["none"]
    assert ex["ssr_diag"] < ex["none"]


def test_result_contract(problem):
    W, H = problem
    r = ternarize_weight(W, H, TernaryConfig(block_size=64))
    n, m = W.shape
    assert r.T.dtype == torch.int8 and r.T.shape == (n, m) and set(r.T.unique().tolist()) <= {-1, 0, 1}
    assert r.alpha.dtype == torch.float32 and r.alpha.shape == (n, m // 64) and (r.alpha >= 0).all()
    assert r.mu.dtype == torch.float32 and r.mu.shape == (n, m // 64)
    assert r.perm.dtype == torch.int64 and r.Q.dtype == torch.float32
    assert torch.equal(r.Q, unpermute(dequantize_blocks(r.T, r.alpha, r.mu, 64), r.perm))
    s = r.stats
    for key in ("E_w_itf", "E_x_itf", "E_w_aga", "E_x_aga", "itf_iters_mean", "itf_iters_max",
                "n_dead_columns", "E_w", "E_x", "mean_abs_shift", "frac_blocks_reordered", "seconds"):
        assert isinstance(s[key], (int, float)), key
    assert s["method"] == "pt2"
    assert s["E_x_aga"] < s["E_x_itf"] and s["E_w_aga"] >= s["E_w_itf"]
    assert 1 <= s["itf_iters_mean"] <= s["itf_iters_max"] <= 20


def test_input_validation():
    W = gaussian_weight(8, 64)
    H = torch.eye(64)
    with pytest.raises(ValueError, match="H is None"):
        ternarize_weight(W, None, TernaryConfig(block_size=16))
    with pytest.raises(ValueError, match="H is None"):
        ternarize_weight(W, None, TernaryConfig(block_size=16, aga=False, compensation="none",
                                                order="act_order"))
    with pytest.raises(ValueError, match=r"expected \(64, 64\)"):
        ternarize_weight(W, torch.eye(32), TernaryConfig(block_size=16))
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ternarize_weight(bad, H, TernaryConfig(block_size=16))
    # without AGA and compensation, H is not needed (SSR orders by W alone)
    r = ternarize_weight(W, None, TernaryConfig(block_size=16, aga=False, compensation="none"))
    assert torch.isfinite(r.Q).all() and "E_x" not in r.stats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_weights(problem, dtype):
    W, H = problem
    r = ternarize_weight(W.to(dtype), H, TernaryConfig(block_size=64))
    assert r.Q.dtype == torch.float32 and torch.isfinite(r.Q).all()
    r32 = ternarize_weight(W.to(dtype).float(), H, TernaryConfig(block_size=64))
    assert torch.equal(r.Q, r32.Q)


def degenerate_cases():
    W = gaussian_weight(32, 64, seed=31)
    W[0] = 0.0
    W[1] = 0.25
    W[2] = 0.0
    W[2, 9] = 0.5
    X = correlated_inputs(256, 64, seed=32)
    dead = X.clone()
    dead[:, [3, 17, 40]] = 0.0
    outlier_x = X.clone()
    outlier_x[:, [5, 50]] *= 1e4
    W_out = W.clone()
    W_out[:, [7, 33]] *= 1e4
    return {
        "degenerate_rows": (W, X),
        "dead_columns": (W, dead),
        "rank_deficient": (W, X[:20]),
        "outlier_activations": (W, outlier_x),
        "outlier_weight_columns": (W_out, X),
    }


@pytest.mark.parametrize("case", list(degenerate_cases()))
@pytest.mark.parametrize("comp", ["exact", "diagonal"])
def test_degenerate_inputs_stay_finite_and_bounded(case, comp, caplog):
    W, X = degenerate_cases()[case]
    H = hessian_of(X).float()
    with caplog.at_level(logging.WARNING):
        r = ternarize_weight(W, H, TernaryConfig(block_size=16, compensation=comp))
    assert torch.isfinite(r.Q).all() and torch.isfinite(r.alpha).all() and (r.alpha >= 0).all()
    assert all(v == v and abs(v) != float("inf") for v in r.stats.values() if isinstance(v, float))
    # bounded: far better than dropping the weight, and no worse than calibration-free RTN
    e_zero = output_error(W, torch.zeros_like(W), H)
    e_rtn = output_error(W, ternarize_weight(W, None, TernaryConfig(method="rtn", block_size=16)).Q, H)
    assert r.stats["E_x"] < 0.01 * e_zero
    if case == "outlier_weight_columns":
        # SSR's mean column is dominated by the two 1e4x columns, so both have the highest cosine
        # and land in one block, where one 3-level grid per row cannot hold two unrelated huge
        # values (E_x ~ 1e-3 of dropping W; RTN keeps each alone in its block: ~1e-7). The
        # natural order keeps them apart and is then better than RTN.
        r = ternarize_weight(W, H, TernaryConfig(block_size=16, compensation=comp, order="natural"))
    assert r.stats["E_x"] <= 1.05 * e_rtn, (r.stats["E_x"], e_rtn)
    if case == "degenerate_rows":
        assert (r.Q[0].abs() < 1e-6).all()
    if case == "dead_columns":
        assert r.stats["n_dead_columns"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(problem):
    W, H = problem
    cfg = TernaryConfig(block_size=64)
    rc = ternarize_weight(W, H, cfg)
    rg = ternarize_weight(W.cuda(), H.cuda(), cfg)
    assert rg.Q.device.type == "cuda" and rg.perm.device.type == "cuda"
    assert (rg.T.cpu() == rc.T).double().mean() > 0.99
    assert rg.stats["E_x"] == pytest.approx(rc.stats["E_x"], rel=1e-2)


def test_schur_aga_metric(problem):
    W, H = problem
    block = ternarize_weight(W, H, TernaryConfig(block_size=64))
    schur = ternarize_weight(W, H, TernaryConfig(block_size=64), aga_metric="schur")
    # AGA is exact in its own metric; the layer-level E_x is not always lower (greedy per block):
    # measured 1.01 here (0.99 with act_order), 0.88-1.01 (mean 0.96) on six SmolLM2 layers
    assert schur.stats["E_x_aga"] < schur.stats["E_x_itf"]
    assert 0.8 * block.stats["E_x"] < schur.stats["E_x"] < 1.05 * block.stats["E_x"]
    assert torch.isfinite(schur.Q).all()
    with pytest.raises(ValueError, match="aga_metric"):
        ternarize_weight(W, H, TernaryConfig(block_size=64, compensation="diagonal"), aga_metric="schur")
    with pytest.raises(ValueError, match="aga_metric"):
        ternarize_weight(W, H, TernaryConfig(block_size=64), aga_metric="diag")
