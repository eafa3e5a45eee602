"""HessianAccumulator and the GPTQ-style preparation of H (pt2pass/quant/hessian.py)."""
import logging

import pytest
import torch

from pt2pass.quant import HessianAccumulator, cholesky_inverse_damped, prepare_hessian
from pt2pass.quant.hessian import mask_dead

from .utils import correlated_inputs, hessian_of


def test_running_mean_equals_batch_formula_any_leading_dims():
    X = correlated_inputs(300, 16, seed=0)
    acc = HessianAccumulator(16, dtype=torch.float64)
    acc.add(X[:7])                                   # 2-D
    acc.add(X[7:107].reshape(4, 25, 16))             # 3-D: (batch, seq, m)
    acc.add(X[107:107])                              # no tokens: a no-op
    acc.add(X[107:].reshape(1, 193, 1, 16))          # 4-D
    assert acc.n_tokens == 300
    torch.testing.assert_close(acc.hessian(), hessian_of(X), rtol=1e-12, atol=1e-12)


def test_float32_is_stable_over_many_batches():
    X = correlated_inputs(20000, 32, seed=1) + 3.0  # a large mean, where plain sums drift
    acc = HessianAccumulator(32)
    for chunk in X.float().split(37):
        acc.add(chunk.to(torch.bfloat16).float())
    ref = hessian_of(X.float().to(torch.bfloat16).double())
    H = acc.hessian()
    assert H.dtype == torch.float32
    assert ((H.double() - ref).abs().max() / ref.abs().max()) < 1e-5


def test_rejects_bad_activations_with_clear_errors():
    acc = HessianAccumulator(8)
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        acc.add(x)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        acc.add(x)
    with pytest.raises(ValueError, match="in_features=8"):
        acc.add(torch.randn(4, 9))
    with pytest.raises(ValueError, match="no activations"):
        acc.hessian()
    assert acc.n_tokens == 0  # a rejected batch leaves the state untouched
    with pytest.raises(ValueError, match="dtype"):
        HessianAccumulator(8, dtype=torch.float16)


def test_prepare_hessian_dead_columns_and_damping():
    X = correlated_inputs(64, 8, seed=2)
    X[:, 3] = 0.0
    H = hessian_of(X)
    W = torch.randn(4, 8)
    Wp, Hd, n_dead = prepare_hessian(W, H, damp=0.01)
    assert n_dead == 1 and (Wp[:, 3] == 0).all() and Wp.dtype == torch.float64
    diag = torch.diagonal(H).clone()
    diag[3] = diag[torch.arange(8) != 3].mean()  # scale-free stand-in (GPTQ's reference: 1)
    torch.testing.assert_close(torch.diagonal(Hd), diag + 0.01 * diag.mean())
    torch.testing.assert_close(mask_dead(Hd, torch.diagonal(H) != 0)[3], torch.zeros(8, dtype=Hd.dtype))
    assert (W[:, 3] != 0).all()  # the caller's W is not modified
    with pytest.raises(ValueError, match="expected \\(8, 8\\)"):
        prepare_hessian(W, H[:4, :4], 0.01)


def test_cholesky_fallback_adds_damping(caplog):
    X = correlated_inputs(3, 16, seed=3)  # rank 3 < 16: singular without damping
    H = hessian_of(X)
    with caplog.at_level(logging.WARNING, logger="pt2pass.quant.hessian"):
        Hinv = cholesky_inverse_damped(H)
    assert "not positive definite" in caplog.text
    assert torch.isfinite(Hinv).all()
    Hgood = H + torch.eye(16, dtype=H.dtype)
    torch.testing.assert_close(cholesky_inverse_damped(Hgood), torch.linalg.inv(Hgood))


def test_grouped_hessians_split_rows_by_offsets():
    """Group g's H is the Hessian of its rows over all batches; an empty group gets all rows'."""
    from pt2pass.quant import GroupedHessians

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 8, generator=g), torch.randn(5, 8, generator=g)]
    offs = [torch.tensor([3, 3, 6]), torch.tensor([1, 1, 5])]  # row 6 of batch 0 belongs to none
    Hs = GroupedHessians(xs, offs, 3)
    assert Hs.counts == [4, 0, 7] and len(Hs) == 3

    def hessian(rows):
        acc = HessianAccumulator(8)
        acc.add(rows)
        return acc.hessian()

    torch.testing.assert_close(Hs[0], hessian(torch.cat([xs[0][:3], xs[1][:1]])))
    torch.testing.assert_close(Hs[2], hessian(torch.cat([xs[0][3:6], xs[1][1:5]])))
    torch.testing.assert_close(Hs[1], hessian(torch.cat([xs[0][:6], xs[1][:5]])))
    with pytest.raises(IndexError):
        Hs[3]
    with pytest.raises(ValueError, match="non-decreasing"):
        GroupedHessians(xs[:1], [torch.tensor([3, 2, 6])], 3)
