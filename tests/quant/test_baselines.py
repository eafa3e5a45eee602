"""RTN ternary and GPTQ baselines (pt2pass/quant/baselines.py)."""
import pytest
import torch

from pt2pass.config import TernaryConfig
from pt2pass.quant import (dequantize_blocks, gptq_quantize, minmax_params, output_error,
                           rtn_ternary, ternarize_weight, unpermute)

from .utils import correlated_inputs, gaussian_weight, hessian_of


def reference_gptq(W, H, wbits, groupsize, actorder, blocksize=128, percdamp=0.01):
    """IST-DASLab/gptq ``GPTQ.fasterquant`` + ``Quantizer`` (asymmetric, per-channel), restated."""
    W, H = W.clone().float(), H.clone().float()
    m = W.shape[1]
    maxq = 2 ** wbits - 1

    def find_params(x):
        xmin = torch.minimum(x.min(1)[0], torch.zeros(x.shape[0]))
        xmax = torch.maximum(x.max(1)[0], torch.zeros(x.shape[0]))
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, +1
        scale = (xmax - xmin) / maxq
        return scale, torch.round(-xmin / scale)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    H[torch.arange(m), torch.arange(m)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, m, blocksize):
        i2 = min(i1 + blocksize, m)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, i1 + i:i1 + i + groupsize])
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
            Q[:, i1 + i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q


@pytest.mark.parametrize("bits,act_order", [(2, False), (2, True), (3, False), (4, True)])
def test_gptq_matches_reference_implementation(bits, act_order):
    X = correlated_inputs(512, 256, seed=41)
    X[:, 10] = 0.0  # a dead column
    H = hessian_of(X).float()
    W = gaussian_weight(64, 256, seed=42)
    r = gptq_quantize(W, H, bits=bits, group_size=128, act_order=act_order)
    Q_ref = reference_gptq(W, H, bits, 128, act_order)
    scale = r.alpha.max().item()
    # our Q = scale*q + mu vs the reference's scale*(q - zero): float32 rounding may flip a few codes
    close = (r.Q - Q_ref).abs() < 1e-4 * scale
    assert close.double().mean() > 0.995
    assert output_error(W, r.Q, H) == pytest.approx(output_error(W, Q_ref, H), rel=2e-3)
    assert r.T.dtype == torch.uint8 and int(r.T.max()) <= 2 ** bits - 1
    assert (r.perm is not None) == act_order
    assert torch.equal(r.Q, unpermute(dequantize_blocks(r.T, r.alpha, r.mu, 128), r.perm))
    assert r.stats["n_dead_columns"] == 1


def test_gptq_beats_round_to_nearest_and_dispatch():
    X = correlated_inputs(512, 128, seed=43)
    H = hessian_of(X).float()
    W = gaussian_weight(64, 128, seed=44)
    r = ternarize_weight(W, H, TernaryConfig(method="gptq", bits=2, block_size=64))
    Qr = torch.cat([_rtn_minmax(Wg, 3) for Wg in W.split(64, 1)], 1)
    assert output_error(W, r.Q, H) < 0.9 * output_error(W, Qr, H)  # measured 0.83
    assert r.stats["bits"] == 2 and r.alpha.shape == (64, 2)
    with pytest.raises(ValueError, match="needs the calibration Hessian"):
        gptq_quantize(W, None)
    # a partial last group (96 = 64 + 32) and 8-bit codes up to 255
    r8 = gptq_quantize(W[:, :96], H[:96, :96], bits=8, group_size=64)
    assert r8.alpha.shape == (64, 2) and int(r8.T.max()) > 127
    e8 = output_error(W[:, :96], r8.Q, H[:96, :96])
    assert e8 < 1e-4 * output_error(W[:, :96], torch.zeros_like(r8.Q), H[:96, :96])


def _rtn_minmax(W, maxq):
    a, off = minmax_params(W, maxq)
    q = torch.clamp(torch.round(W / a[:, None]) + torch.round(-off / a)[:, None], 0, maxq)
    return a[:, None] * q + off[:, None]


def test_rtn_ternary_matches_twn_definition():
    W = gaussian_weight(16, 80, seed=45)  # blocks 32, 32, 16 (partial last block)
    W[3, 32:64] = 0.0                     # an all-zero block: T = 0, alpha = 0
    r = rtn_ternary(W, 32)
    assert r.perm is None and r.alpha.shape == (16, 3) and (r.mu == 0).all()
    for b, Wb in enumerate(W.split(32, 1)):
        A = Wb.abs()
        keep = A > 0.7 * A.mean(1, keepdim=True)
        T = torch.sign(Wb) * keep
        assert torch.equal(r.T[:, 32 * b:32 * b + Wb.shape[1]].float(), T)
        alpha = (A * keep).sum(1) / keep.sum(1).clamp_min(1)
        torch.testing.assert_close(r.alpha[:, b], alpha)
    assert r.alpha[3, 1] == 0 and (r.Q[3, 32:64] == 0).all()
    assert torch.equal(r.Q, dequantize_blocks(r.T, r.alpha, r.mu, 32))
    assert r.stats["E_w"] == pytest.approx(((W.double() - r.Q.double()) ** 2).sum().item())
