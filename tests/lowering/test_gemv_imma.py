"""The integer-MMA GEMV (1-16 rows of x) and its fragment quantizer, under the Triton interpreter,
where imma.emulated_mma computes each mma.sync from the lanes' registers by the PTX fragment
definitions (the real instruction is checked on the GPU by
benchmarks/experiments/sweep_gemv_imma.py and benchmarks/fuzz_kernels.py)."""
import pytest
import torch
import triton
import triton.language as tl
from conftest import gemv_vs_reference, random_ternary_layer_cpu, rel_err

from pt2pass.lowering.format import pack_ternary
from pt2pass.lowering.kernels import dispatch, gemv_imma
from pt2pass.lowering.kernels.common import INTERPRET
from pt2pass.lowering.kernels.gemv_dp2a import quantize_x
from pt2pass.lowering.kernels.gemv_imma import quantize_x_imma, ternary_gemv_imma
from pt2pass.lowering.kernels.imma import emulated_mma

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _x(m, k, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]).to(dtype)


def _fragment_ints(xf, m, k):
    """x_int (m, k) back from the fragment words: word s * 128 + 4 (4 g + t) + 2 h + reg of block b
    in tile m // 8 (g = m % 8) holds byte h of the x_int at column 128 b + 8 (r + 4 i) + j, byte i,
    r = 2 (s % 2) + reg, j = 2 t + s // 2 (imma.py's module doc)."""
    out = torch.zeros(m, k, dtype=torch.int64)
    for row in range(m):
        for b in range(k // 128):
            for s in range(4):
                for reg in range(2):
                    for t in range(4):
                        words = [int(xf[row // 8, b, s * 128 + 4 * (4 * (row % 8) + t) + 2 * h + reg]) for h in (0, 1)]
                        for i in range(4):
                            hi = ((words[0] >> 8 * i) & 0xFF) - (256 if (words[0] >> 8 * i) & 0x80 else 0)
                            lo = (words[1] >> 8 * i) & 0xFF
                            col = 128 * b + 8 * (2 * (s % 2) + reg + 4 * i) + 2 * t + s // 2
                            out[row, col] = 256 * hi + lo
    return out


@pytest.mark.parametrize("m,perm", [(3, False), (9, True)])
def test_quantize_writes_the_dp2a_integers_as_fragments(m, perm):
    k = 256
    x = _x(m, k, seed=m)
    p = torch.randperm(k, generator=torch.Generator().manual_seed(4)) if perm else None
    xf, xstat = quantize_x_imma(x, p)
    rows = 8 * ((m + 7) // 8)
    assert xf.shape == (rows // 8, k // 128, 512) and xstat.shape == (k // 128, rows, 4)  # statistics block-major
    scale, xint, xs, pad = xstat.permute(2, 1, 0)
    xp_ref, scale_ref, xint_ref, xs_ref = quantize_x(x, p)  # the dp2a GEMV's quantization
    assert torch.equal(scale[:m], scale_ref) and torch.equal(xint[:m], xint_ref.float()) and torch.equal(xs[:m], xs_ref)
    assert not pad.any()
    x_int = _fragment_ints(xf, rows, k)
    cols = (x[:, p] if perm else x).float()
    t = cols / scale_ref.repeat_interleave(128, dim=1)
    assert torch.equal(x_int[:m], (t.sign() * (t.abs() + 0.5).floor()).long())
    assert torch.equal(xint[:m].long(), x_int[:m].view(m, -1, 128).sum(dim=2))
    assert not x_int[m:].any() and not xint[m:].any() and not xs[m:].any()  # the padding rows are zero


@triton.jit
def _mma_kernel(regs_ptr, out_ptr, B_SIGNED: tl.constexpr, WARPS: tl.constexpr):
    e = tl.arange(0, 32 * WARPS)[None, :]
    r = [tl.load(regs_ptr + i * 32 * WARPS + e) for i in tl.static_range(10)]
    d = emulated_mma(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], B_SIGNED, 1, WARPS)
    for i in tl.static_range(4):
        tl.store(out_ptr + i * 32 * WARPS + e, d[i])


@pytest.mark.parametrize("signed", [False, True])
def test_emulated_mma_follows_the_ptx_fragment_layout(signed):
    """Against the fragment definitions of the PTX ISA (mma.m16n8k32, 8-bit A and B, s32 C/D),
    written out lane by lane: A row g / g + 8, columns 4t + i and 16 + 4t + i; B column g, rows
    4t + i and 16 + 4t + i; D rows g / g + 8, columns 2t and 2t + 1."""
    warps = 2
    g = torch.Generator().manual_seed(int(signed))
    regs = torch.randint(-2**31, 2**31, (10, 32 * warps), generator=g, dtype=torch.int64).to(torch.int32)
    out = torch.empty(4, 32 * warps, dtype=torch.int32)
    _mma_kernel[(1,)](regs, out, B_SIGNED=signed, WARPS=warps)

    def byte(v, i, sign):
        b = (int(v) >> 8 * i) & 0xFF
        return b - 256 if sign and b >= 128 else b

    for w in range(warps):
        A = torch.zeros(16, 32, dtype=torch.int64)
        B = torch.zeros(32, 8, dtype=torch.int64)
        for lane in range(32):
            gid, t = lane // 4, lane % 4
            reg = regs[:, 32 * w + lane]
            for i in range(4):
                A[gid, 4 * t + i], A[gid + 8, 4 * t + i] = byte(reg[0], i, False), byte(reg[1], i, False)
                A[gid, 16 + 4 * t + i], A[gid + 8, 16 + 4 * t + i] = byte(reg[2], i, False), byte(reg[3], i, False)
                B[4 * t + i, gid], B[16 + 4 * t + i, gid] = byte(reg[4], i, signed), byte(reg[5], i, signed)
        D = A @ B
        for lane in range(32):
            gid, t = lane // 4, lane % 4
            c = regs[6:, 32 * w + lane].long()
            want = [D[gid, 2 * t], D[gid, 2 * t + 1], D[gid + 8, 2 * t], D[gid + 8, 2 * t + 1]]
            assert [int(out[i, 32 * w + lane]) for i in range(4)] == [int(c[i] + want[i]) for i in range(4)]


@pytest.mark.parametrize("m,n,k,dtype,bias,perm,split,config", [
    (1, 32, 128, torch.bfloat16, False, False, 1, None),
    (2, 40, 384, torch.float16, True, True, 1, None),
    (5, 48, 512, torch.bfloat16, True, False, 3, None),
    (8, 17, 256, torch.float16, False, True, 2, {"R": 2, "WARPS": 1, "NBT": 3, "num_warps": 1}),
    (9, 64, 256, torch.bfloat16, True, True, 1, {"R": 1, "WARPS": 2, "NBT": 1, "num_warps": 2}),
    (16, 70, 384, torch.float16, True, False, 2, {"R": 2, "WARPS": 2, "NBT": 2, "num_warps": 2}),
    # K / 128 a multiple of 8: alpha and mu as one vector per NBT blocks, the split rounded to 8 blocks
    (4, 40, 1024, torch.bfloat16, True, True, 1, None),
    (12, 33, 2048, torch.float16, False, False, 3, {"R": 1, "WARPS": 2, "NBT": 4, "num_warps": 2}),
    # the experiments' switch for loading the streamed data past L1 (a cache hint: same results)
    (7, 40, 1024, torch.bfloat16, True, False, 2, {"R": 1, "WARPS": 2, "NBT": 2, "num_warps": 2, "STREAM_CG": True}),
])
def test_matches_reference(m, n, k, dtype, bias, perm, split, config):
    # rows past N and blocks past the K split inside an unrolled iteration (NBT 3) are masked
    x = _x(m, k, seed=m + n, dtype=dtype)
    out, ref = gemv_vs_reference(ternary_gemv_imma, x, n, seed=n + k, bias=bias, perm=perm, split=split,
                                 config=config)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


def test_extreme_codes_and_values_are_exact():
    # every code 2 (T = +1) or 0 (T = -1) against x_int = +-X_MAX: the largest integer sums
    k, n, m = 256, 16, 9
    T = torch.ones(n, k, dtype=torch.int64)
    T[1::2] = -1
    x = torch.full((m, k), 3.0, dtype=torch.float16)
    x[:, ::3] = -3.0
    x[4] *= -1
    alpha = torch.ones(n, k // 128, dtype=torch.float16)
    mu = torch.zeros(n, k // 128, dtype=torch.float16)
    out = torch.empty(m, n, dtype=torch.float16)
    ternary_gemv_imma(x, pack_ternary(T), alpha, mu, None, None, out)
    assert torch.equal(out.double(), x.double() @ T.double().T)  # integers <= 768: exact in fp16


def test_rows_use_their_own_scales_and_nan_stays_in_its_row():
    x = torch.cat([_x(1, 256, seed=1) * 1e-3, _x(1, 256, seed=2) * 1e3, _x(1, 256, seed=3)]).to(torch.bfloat16)
    x[2, 7] = float("nan")
    out, ref = gemv_vs_reference(ternary_gemv_imma, x, 24, seed=5)
    assert all(rel_err(out[i:i + 1], ref[i:i + 1]) < TOL[torch.bfloat16] for i in range(2))
    assert out[2].isnan().all() and not out[:2].isnan().any()


def test_rejects_what_it_cannot_run():
    packed, alpha, mu, _, _ = random_ternary_layer_cpu(16, 128, 0, False, False, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16/fp16"):
        ternary_gemv_imma(torch.randn(2, 128), packed, alpha, mu, None, None, torch.empty(2, 16))
    with pytest.raises(ValueError, match="1..16 rows"):
        ternary_gemv_imma(torch.randn(17, 128).bfloat16(), packed, alpha, mu, None, None, torch.empty(17, 16))
    odd = torch.cat([torch.zeros(1, dtype=torch.int32), packed.flatten()])[1:].view(16, 8)
    with pytest.raises(ValueError, match="storage offset"):
        ternary_gemv_imma(torch.randn(2, 128).bfloat16(), odd, alpha, mu, None, None, torch.empty(2, 16))


def test_dispatcher_sends_small_m_here_unless_the_words_are_misaligned():
    packed, alpha, mu, _, _ = random_ternary_layer_cpu(16, 128, 0, False, False, torch.bfloat16)
    odd = torch.cat([torch.zeros(1, dtype=torch.int32), packed.flatten()])[1:].view(16, 8)
    assert [dispatch.small_m_kernel(m, 16, 128, torch.bfloat16, packed) for m in (1, 2, 3, 8, 9, 16, 17)] == \
        ["gemv_half2", "gemv_packed", "gemv_imma", "gemv_imma", None, None, None]
    big = dispatch.DP2A_MIN_WEIGHTS
    assert [dispatch.small_m_kernel(m, big, 1, torch.float16, packed) for m in (1, 2, 9, 16, 17)] == \
        ["gemv_dp2a", "gemv_imma", "gemv_imma", "gemv_imma", None]
    assert dispatch.small_m_kernel(4, 16, 128, torch.bfloat16, odd) is None
    assert dispatch.small_m_kernel(4, 16, 128, torch.float32, packed) is None
    x = _x(4, 128, seed=0)
    y = dispatch.ternary_linear_triton(x, odd, alpha, mu)  # the GEMM instead, same result
    assert rel_err(y, dispatch.ternary_linear_triton(x, packed, alpha, mu).double()) < 1e-2


@pytest.mark.parametrize("k,split,config,aligned,bps", [
    (2048, 3, None, True, 8),        # 16 blocks: 6 per split rounded up to 8 (2 splits)
    (1024, 5, None, True, 8),        # 8 blocks: one split of 8
    (4096, 3, {"R": 1, "WARPS": 1, "NBT": 4, "num_warps": 1}, True, 16),
    (2048, 3, {"R": 1, "WARPS": 1, "NBT": 3, "num_warps": 1}, False, 6),  # NBT 3 does not divide 8
    (1152, 2, None, False, 5),       # 9 blocks: scalar scale loads, the split as asked
])
def test_scale_vectors_only_where_every_split_starts_on_a_whole_vector(monkeypatch, k, split, config, aligned, bps):
    # the vector loads' alignment is a hint to the GPU compiler (the interpreter ignores it), so
    # the launcher's guarantee is checked here: K / 128 and the blocks per split multiples of 8
    seen = {}

    def spy(kernel, grid, fixed, cfg, *args, program_rows, **meta):
        seen.update(bps=args[11], aligned=meta["ALIGNED"], target=args[6].shape)

    monkeypatch.setattr(gemv_imma, "launch_tuned", spy)
    packed, alpha, mu, _, _ = random_ternary_layer_cpu(16, k, 0, False, False, torch.bfloat16)
    ternary_gemv_imma(_x(2, k, seed=1), packed, alpha, mu, None, None, torch.empty(2, 16, dtype=torch.bfloat16),
                      split=split, config=config)
    splits = triton.cdiv(k // 128, bps)
    assert (seen["aligned"], seen["bps"]) == (aligned, bps)
    assert seen["target"] == ((splits, 2, 16) if splits > 1 else (2, 16))
