"""SSR block choice and static orders (pt2pass/quant/ssr.py), and permutation bookkeeping."""
import pytest
import torch

from pt2pass.config import TernaryConfig
from pt2pass.lowering.format import PackedTernary, pack_ternary
from pt2pass.quant import (cosine_to_mean, dequantize_blocks, next_block, static_order,
                           ternarize_weight, unpermute)

from .utils import correlated_inputs, gaussian_weight, hessian_of


def test_next_block_picks_highest_signed_cosine():
    W = gaussian_weight(32, 40, seed=0, dtype=torch.float64) + 0.01
    remaining = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 39])
    B = next_block(W, remaining, 5)
    Wr = W[:, remaining]
    wbar = Wr.mean(1)
    cos = torch.tensor([float(torch.dot(Wr[:, j], wbar) / (Wr[:, j].norm() * wbar.norm()))
                        for j in range(len(remaining))])
    expected = remaining[torch.argsort(cos, descending=True)[:5]].sort().values
    assert torch.equal(B, expected)
    assert torch.allclose(cosine_to_mean(Wr), cos.double())
    # signed: a column anti-parallel to the mean has cos = -1 and is picked last
    W2 = W.clone()
    W2[:, 3] = -10 * W[:, remaining].mean(1)
    assert 3 not in next_block(W2, remaining, 11).tolist()


def test_last_block_takes_what_remains():
    W = gaussian_weight(8, 20, seed=1)
    remaining = torch.tensor([19, 2, 7])
    assert next_block(W, remaining, 16).tolist() == [2, 7, 19]


def test_zero_columns_and_zero_mean_do_not_produce_nan():
    W = gaussian_weight(8, 32, seed=2)
    W[:, ::2] = 0.0
    cos = cosine_to_mean(W)
    assert torch.isfinite(cos).all() and (cos[::2] == 0).all()
    B = next_block(W, torch.arange(32), 8)
    assert torch.isfinite(cos).all() and len(set(B.tolist())) == 8
    Z = torch.zeros(8, 32)
    assert next_block(Z, torch.arange(32), 8).tolist() == list(range(8))  # ties: stable
    W3 = torch.cat([W[:, :16], -W[:, :16]], 1)  # mean exactly 0
    assert torch.isfinite(cosine_to_mean(W3)).all()


def test_static_orders():
    H = torch.diag(torch.tensor([1.0, 5.0, 3.0, 5.0]))
    assert static_order("natural", 4).tolist() == [0, 1, 2, 3]
    assert static_order("act_order", 4, H).tolist() == [1, 3, 2, 0]
    with pytest.raises(ValueError, match="act_order"):
        static_order("act_order", 4)
    with pytest.raises(ValueError, match="ssr"):
        static_order("ssr", 4, H)


@pytest.mark.parametrize("order,m", [("ssr", 128), ("act_order", 128), ("natural", 128),
                                     ("ssr", 80), ("act_order", 80)])
def test_permutation_bookkeeping(order, m):
    X = correlated_inputs(256, m, seed=3)
    H = hessian_of(X).float()
    W = gaussian_weight(48, m, seed=4)
    W[:, 64:] += 0.05  # two column families, so SSR has something to separate
    r = ternarize_weight(W, H, TernaryConfig(order=order, block_size=32))
    assert r.block_size == 32 and r.alpha.shape == (48, -(-m // 32))  # m=80: blocks 32, 32, 16
    perm = r.perm if r.perm is not None else torch.arange(m)
    assert order == "natural" or r.perm is not None
    assert r.perm is None or r.perm.dtype == torch.int64
    assert torch.equal(perm.sort().values, torch.arange(m))
    Qp = dequantize_blocks(r.T, r.alpha, r.mu, 32)
    assert torch.equal(r.Q, unpermute(Qp, r.perm))
    assert torch.equal(r.Q[:, perm], Qp)
    # the deployable packed format reproduces Q bit for bit, permutation undone
    packed = PackedTernary(pack_ternary(r.T), r.alpha, r.mu, r.perm, block_size=32)
    assert torch.equal(packed.dequantize(), r.Q)
    if order != "natural":
        assert r.stats["frac_blocks_reordered"] > 0 and r.stats["mean_abs_shift"] > 0


def test_ssr_groups_similar_columns_together():
    # columns of two directions; SSR's first block must be one family (the one closer to the mean)
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(64, 1, generator=g), torch.randn(64, 1, generator=g)
    W = torch.cat([u + 0.1 * torch.randn(64, 32, generator=g),
                   v + 0.1 * torch.randn(64, 32, generator=g)], 1)
    W = W[:, torch.randperm(64, generator=g)]
    is_u = torch.tensor([bool(torch.dot(W[:, j], u[:, 0]) > torch.dot(W[:, j], v[:, 0]))
                         for j in range(64)])
    B = next_block(W, torch.arange(64), 32)
    fam = is_u[B]
    assert fam.all() or (~fam).all()
