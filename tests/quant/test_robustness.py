"""Numerical robustness of ternarize_weight / quantize_linear on ill-conditioned inputs.

Every case must stay finite, and the layer output error E_x = tr((W - Q) H (W - Q)^T) must stay
bounded against calibration-free RTN ternary on the same layer (pt2 uses the calibration data, so
losing to RTN by more than a small factor means something broke), and against dropping the
weight (E_x of Q = 0). Sizes are small (32 x 256, blocks of 64) so the file runs in seconds.
"""
import logging

import pytest
import torch

from pt2pass import TernaryConfig
from pt2pass.passes.layer_quantizer import quantize_linear
from pt2pass.quant import output_error, ternarize_weight

from .utils import correlated_inputs, gaussian_weight, hessian_of

K, N, BLOCK = 256, 32, 64


def _rtn_error(W, H):
    return output_error(W, ternarize_weight(W, None, TernaryConfig(method="rtn", block_size=BLOCK)).Q, H)


def _quantize(W, X, **settings):
    H = hessian_of(X).float()
    r = ternarize_weight(W, H, TernaryConfig(block_size=BLOCK, **settings))
    assert torch.isfinite(r.Q).all() and torch.isfinite(r.alpha).all() and torch.isfinite(r.mu).all()
    assert (r.alpha >= 0).all()
    assert all(v == v and abs(v) != float("inf") for v in r.stats.values() if isinstance(v, float))
    return r, H


@pytest.fixture(scope="module")
def layer():
    return gaussian_weight(N, K, seed=1), correlated_inputs(512, K, seed=2)


# ---- near-singular Hessians ---------------------------------------------------------------------

@pytest.mark.parametrize("damp", [0.01, 0.0])
@pytest.mark.parametrize("comp", ["exact", "diagonal"])
def test_rank_deficient_hessian_from_10_samples(layer, damp, comp, caplog):
    """10 tokens for 256 inputs: H has rank 10. Damping (or, at damp=0, the Cholesky retry with
    extra damping) keeps the inverse finite, and the 10-dimensional output is fitted well."""
    W, X = layer
    with caplog.at_level(logging.WARNING, logger="pt2pass.quant.hessian"):
        r, H = _quantize(W, X[:10], damp=damp, compensation=comp)
    if damp == 0.0:
        assert "not positive definite" in caplog.text
    assert r.stats["E_x"] <= 0.5 * _rtn_error(W, H)  # measured 0.20-0.32
    assert r.stats["E_x"] <= 0.1 * output_error(W, torch.zeros_like(W), H)  # measured 0.032-0.052


@pytest.mark.parametrize("damp", [0.01, 0.0])
def test_duplicated_input_columns(layer, damp):
    """Columns 128..255 repeat columns 0..127: H is exactly singular (rank 128)."""
    W, X = layer
    X = X.clone()
    X[:, 128:] = X[:, :128]
    r, H = _quantize(W, X, damp=damp)
    assert r.stats["E_x"] <= 0.75 * _rtn_error(W, H)  # measured 0.46-0.48


@pytest.mark.parametrize("scale", [1e3, 1e-6])
def test_hessian_scale_does_not_change_the_result(layer, scale):
    """H scaled by 1e6 or 1e-12 (huge or tiny activations): same T, same relative error."""
    W, X = layer
    base, H = _quantize(W, X)
    scaled, Hs = _quantize(W, X * scale)
    rel = lambda r, h: r.stats["E_x"] / output_error(W, torch.zeros_like(W), h)
    assert rel(scaled, Hs) == pytest.approx(rel(base, H), rel=1e-3)


@pytest.mark.parametrize("refine", [0, 2])
def test_dead_inputs_keep_the_result_scale_free_and_weigh_nothing_in_aga(layer, refine):
    """8 inputs always 0. Their stand-in diagonal used to be an absolute 1, which at small
    activations dominated the damping and AGA's metric (E_x 12.36 -> 15.75 at H x 1e-4, worse
    than without AGA); it is now scale-free and AGA gives those columns no weight."""
    W, X = layer
    X = X.clone()
    X[:, [3, 40, 77, 130, 200, 201, 250, 251]] = 0.0
    results = [_quantize(W, X * s, refine_rounds=refine)[0] for s in (1.0, 1e-2)]
    H = hessian_of(X).float()
    errors = [output_error(W, r.Q, H) for r in results]
    assert errors[1] == pytest.approx(errors[0], rel=1e-4)
    assert all(torch.equal(r.T, results[0].T) for r in results)
    no_aga = output_error(W, _quantize(W, X * 1e-2, aga=False)[0].Q, H)
    assert errors[1] < no_aga


# ---- outliers -------------------------------------------------------------------------------

def test_outlier_activation_columns(layer):
    W, X = layer
    X = X.clone()
    X[:, [3, 100]] *= 1e4
    r, H = _quantize(W, X)
    assert r.stats["E_x"] <= 0.1 * _rtn_error(W, H)  # measured ~1e-4: the outlier inputs are kept


@pytest.mark.parametrize("n_cols, factor", [(2, 1e3), (2, 1e4), (4, 1e4)])
def test_outlier_weight_columns_are_never_worse_than_rtn(layer, n_cols, factor, caplog):
    """Regression: SSR grouped several 1e3-1e4x weight columns into one block (they dominate the
    mean column, so they have the highest cosine), where one 3-level grid per row cannot hold
    unrelated huge values: E_x was 14-35000x that of RTN. ternarize_weight now checks layers
    with outlier columns against RTN and falls back to the natural order (or RTN)."""
    W, X = layer
    W = W.clone()
    cols = torch.randperm(K, generator=torch.Generator().manual_seed(0))[:n_cols]
    W[:, cols] *= factor
    with caplog.at_level(logging.WARNING, logger="pt2pass.quant.gptq"):
        r, H = _quantize(W, X)
    assert r.stats["E_x"] <= _rtn_error(W, H)
    assert r.stats["ssr_fallback"] in ("natural", "rtn") and "outlier columns" in caplog.text
    assert r.stats["E_x"] <= 0.9 * _rtn_error(W, H)  # measured 0.08-0.83: natural order wins


def test_single_outlier_column_keeps_the_ssr_result(layer):
    """One outlier column cannot share a block with another: no check, no fallback."""
    W, X = layer
    W = W.clone()
    W[:, 7] *= 1e4
    r, H = _quantize(W, X)
    assert "ssr_fallback" not in r.stats and r.perm is not None
    assert r.stats["E_x"] <= _rtn_error(W, H)  # measured 0.49


# ---- degenerate weights -----------------------------------------------------------------------

def test_rows_with_a_single_nonzero_value_are_reconstructed(layer):
    W, X = layer
    Ws = torch.zeros_like(W)
    cols = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(3))
    Ws[torch.arange(N), cols] = torch.randn(N, generator=torch.Generator().manual_seed(4))
    r, _ = _quantize(Ws, X)
    # {0, w} fits a 3-level grid exactly: the value within 0.1%, the zeros stay (near) zero
    rel = (r.Q - Ws).abs().max(1).values / Ws.abs().max(1).values
    assert rel.max() < 1e-3


@pytest.mark.parametrize("samples", [512, 10])
def test_all_zero_weight_gives_exactly_zero(layer, samples):
    W, X = layer
    r, _ = _quantize(torch.zeros_like(W), X[:samples])
    assert (r.Q == 0).all() and (r.alpha == 0).all() and r.stats["E_x"] == 0.0


def test_zero_rows_stay_exactly_zero_with_compensation(layer):
    W, X = layer
    W = W.clone()
    W[[0, 5, 31]] = 0.0
    r, H = _quantize(W, X)
    assert (r.Q[[0, 5, 31]] == 0).all()
    assert r.stats["E_x"] <= 0.75 * _rtn_error(W, H)


def test_constant_rows_are_exact(layer):
    W, X = layer
    Wc = torch.full_like(W, 0.3)
    Wc[1::2] = -0.7
    r, _ = _quantize(Wc, X)
    torch.testing.assert_close(r.Q, Wc, rtol=1e-6, atol=0)


def test_all_inputs_dead(layer):
    """H = 0 (every input was 0 on the calibration set): all columns dead, output error 0."""
    W, _ = layer
    r = ternarize_weight(W, torch.zeros(K, K), TernaryConfig(block_size=BLOCK))
    assert torch.isfinite(r.Q).all() and r.stats["n_dead_columns"] == K and r.stats["E_x"] == 0.0


# ---- float16 range ----------------------------------------------------------------------------

@pytest.mark.parametrize("target_max", [6.0e4, 1e-3])
def test_float16_weights_near_the_range_limits(layer, target_max):
    """fp16 weights with max |W| near 65504 or ~1e-3: the error relative to dropping the weight
    matches the well-scaled layer (ternarization is scale-invariant)."""
    W, X = layer
    base, H = _quantize(W, X)
    Wf = (W * (target_max / W.abs().max())).half()
    r, _ = _quantize(Wf, X)
    rel = lambda res, w: res.stats["E_x"] / output_error(w, torch.zeros_like(w), H)
    assert rel(r, Wf) == pytest.approx(rel(base, W), rel=0.05)


@pytest.mark.parametrize("scale, dtype", [(1e-6, torch.float32), (1e7, torch.float32),
                                          (1.0, torch.float16)])
def test_quantize_linear_keeps_scales_exact(layer, scale, dtype, caplog):
    """Regression: alpha/mu were rounded to float16 unless they overflowed, so a layer with tiny
    weights (|W| ~ 2e-8: scales in float16's subnormal range) came back 99% wrong (|W| ~ 2e-7:
    11%). Now float16 is used only when it changes the dequantized weight by less than 2^-9
    relative; otherwise the scales are stored in float32."""
    W, X = layer
    W = W * scale
    H = hessian_of(X).float()
    with caplog.at_level(logging.WARNING, logger="pt2pass.passes.layer_quantizer"):
        q, Q = quantize_linear("layer.weight", W, H, TernaryConfig(block_size=BLOCK))
    exact = ternarize_weight(W, H, TernaryConfig(block_size=BLOCK)).Q
    assert torch.isfinite(Q).all()
    assert q.alpha.dtype == dtype
    assert ("layer.weight: float16 scales" in caplog.text) == (dtype == torch.float32)
    assert (Q.double() - exact.double()).norm() <= 2.0 ** -9 * exact.double().norm()


def test_quantize_linear_names_the_layer_in_errors():
    W = torch.ones(4, 32)
    W[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"^model\.layers\.3\.mlp\.up_proj\.weight: W contains NaN/Inf"):
        quantize_linear("model.layers.3.mlp.up_proj.weight", W, torch.eye(32),
                        TernaryConfig(block_size=16))
