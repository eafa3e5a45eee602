"""Experimental tensor-core kernel for small M (not used by pt2pass: it lost, see
docs/results.md "Session 2"). Kept so the measurement can be repeated.

Swap AB: the (BN, 128) ternary tile is the A operand of the MMA (wgmma on Hopper), x^T padded to
BM = 16 columns is B, so M = 1..16 cost the same. Word layout (``pack_tc``): word j of a row holds
columns 16 j .. 16 j + 15; column 16 j + 2 i at bits 2 i, column 16 j + 2 i + 1 at bits 2 i + 16,
so one LOP3 turns the codes of columns (16 j + 2 i, + 1) into a bf16x2 pair 1 + q * 2^(p - 7).
Pairs 0-2 are masked in place, 3-5 after >> 6, 6-7 after >> 12 (p = 2 (i % 3)); x is pre-scaled
by 2^(7 - p) per column so that v x' = x' + q x exactly. Per 128-block:
y += alpha * (sum v x' - sum x' - sum x) + mu * sum x.
"""
import torch, triton, triton.language as tl

@triton.jit
def _pair(words, i: tl.constexpr, one2):
    # pairs 0-2: bits 2i (low half) / 2i+16 (high half) masked in place (value 1 + q 2^(2i-7));
    # pairs 3-5 after >> 6, pairs 6-7 after >> 12: code at bf16 mantissa bits p = 2 (i % 3)
    P: tl.constexpr = 2 * (i % 3)
    SH: tl.constexpr = 2 * i - P
    t = words >> SH
    return (t & ((3 << P) | (3 << (P + 16)))) | one2

@triton.jit
def _tile(words, one2):
    p = tl.join(tl.join(tl.join(_pair(words, 0, one2), _pair(words, 1, one2)), tl.join(_pair(words, 2, one2), _pair(words, 3, one2))),
                tl.join(tl.join(_pair(words, 4, one2), _pair(words, 5, one2)), tl.join(_pair(words, 6, one2), _pair(words, 7, one2))))
    p = tl.permute(p, (0, 1, 4, 3, 2))
    p = tl.reshape(p, (p.shape[0], 8, 8))
    lo = (p & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
    hi = (p >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    w = tl.join(lo, hi)                      # [BN, j, i, h] -> column 16 j + 2 i + h
    return tl.reshape(w, (w.shape[0], 128))

@triton.jit
def tc_kernel(x_ptr, w_ptr, a_ptr, mu_ptr, out_ptr, M, N, KW, NB, stride_xm, blocks_per_split, one2,
              SPLIT_OUT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, NSTAGE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    rm = tl.arange(0, BM)
    m_ok = rm < M
    ij = tl.arange(0, 8)
    ik = tl.arange(0, 128)
    # x pre-scale of column 16 j + 2 i + h: 2^(7 - 2 (i % 3)) so that v x' = x' + q x exactly
    scale = (1 << (7 - 2 * ((ik % 16) // 2 % 3))).to(tl.float32)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * KW
    x_cols = x_ptr + rm[None, :] * stride_xm
    b_lo = pid_k * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, NB)
    y = tl.zeros((BN, BM), tl.float32)
    for b in tl.range(b_lo, b_hi, num_stages=NSTAGE):
        words = tl.load(w_rows + b * 8 + ij[None, :], mask=n_ok[:, None], other=0)
        al = tl.load(a_ptr + rn * NB + b, mask=n_ok, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + rn * NB + b, mask=n_ok, other=0.0).to(tl.float32)
        xt = tl.load(x_cols + (b * 128 + ik)[:, None], mask=m_ok[None, :], other=0.0).to(tl.float32)
        xs = xt * scale[:, None]
        s = tl.sum(xt, axis=0)
        c = tl.sum(xs, axis=0) + s            # sum x' + sum x
        d = tl.dot(_tile(words, one2), xs.to(tl.bfloat16))   # sum v x' = sum x' + sum q x
        y += al[:, None] * (d - c[None, :]) + mu[:, None] * s[None, :]
    if SPLIT_OUT:
        optr = out_ptr + (pid_k * M + rm)[None, :] * N + rn[:, None]
        tl.store(optr, y, mask=m_ok[None, :] & n_ok[:, None])
    else:
        optr = out_ptr + rm[None, :] * N + rn[:, None]
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=m_ok[None, :] & n_ok[:, None])

ONE2 = 0x3F803F80

def pack_tc(T):
    """T int8 (N, K) in {-1,0,1} -> int32 (N, K/16): word j of row covers columns 16j..16j+15;
    column 16j + 2i at bits 2i, column 16j + 2i + 1 at bits 2i + 16 (i = 0..7)."""
    n, k = T.shape
    q = (T.to(torch.int64) + 1).view(n, k // 16, 8, 2)
    shifts = (2 * torch.arange(8, device=T.device))[:, None] + 16 * torch.arange(2, device=T.device)[None, :]
    w = (q << shifts).sum((-1, -2))
    w = torch.where(w >= 2**31, w - 2**32, w)
    return w.to(torch.int32)
