"""Ternary kernels vs bf16 cuBLAS (F.linear) vs gemlite 2-bit group-128, on one GPU.

    python3 benchmarks/bench_kernels.py            # full table (7 shapes x 6 batch sizes)
    python3 benchmarks/bench_kernels.py --quick    # 3 shapes, plus GEMV-vs-GEMM path timings
    python3 benchmarks/bench_kernels.py --ms 1 --shapes 4096x4096 11008x4096   # a subset

Correctness first (fresh random inputs, output poisoned, relative error vs a float64 reference of
the dequantized weight; exits non-zero above 1e-2), then median times of CUDA-graph replays that
cycle through enough weight copies that L2 (50 MB) holds none of them (>= 200 MB per graph).
Writes a JSON of all numbers to $OUT/bench_kernels.json when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pt2pass  # noqa: E402,F401  (registers the op)
from pt2pass.bench import ROTATE_BYTES, parse_shape, rel_err, time_graph  # noqa: E402
from pt2pass.bench import random_ternary_layer as make_layer  # noqa: E402
from pt2pass.bench import rotating_copies as copies  # noqa: E402
from pt2pass.lowering.format import dequantize  # noqa: E402
from pt2pass.lowering.kernels import dispatch  # noqa: E402
from pt2pass.lowering.kernels.gemm import ternary_gemm  # noqa: E402
from pt2pass.lowering.kernels.gemv_half2 import ternary_gemv_half2  # noqa: E402

# largest first: they carry the bandwidth target
SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]
MS = [1, 4, 16, 64, 256, 2048]
# The %BW column: bytes moved per second over this device's device-to-device copy bandwidth
# (bytes read + written), measured at the start of each run (was a fixed 3.0 TB/s, the H100's).
PEAK_BW = 3.0e12
OP = torch.ops.pt2pass.ternary_linear


def gemlite_layers(T, alpha, mu, r):
    import gemlite  # noqa: F401
    from gemlite.helper import A16Wn

    # W = alpha*(q-1)+mu = (q - z) * alpha with z = 1 - mu/alpha (asymmetric 2-bit, group 128)
    zeros = (1 - mu.float() / alpha.float()).to(torch.bfloat16)
    wq = (T + 1).to(torch.uint8)
    return [A16Wn(device="cuda:0", dtype=torch.bfloat16).from_weights(wq.clone(), alpha.clone(), zeros.clone(),
                                                                      W_nbits=2, group_size=128) for _ in range(r)]


def measure_shape(n, k, ms, dev, use_gemlite, log):
    T, packed, alpha, mu = make_layer(n, k, dev)
    w64 = dequantize(packed, alpha.double(), mu.double(), dtype=torch.float64)
    w16 = w64.to(torch.bfloat16)
    tern = copies((packed, alpha, mu), packed.numel() * 4 + alpha.numel() * 4)
    dense = copies((w16,), w16.numel() * 2)
    glite, gl_err = None, None
    if use_gemlite:
        try:
            glite = gemlite_layers(T, alpha, mu, max(2, math.ceil(ROTATE_BYTES / (packed.numel() * 4))))
        except Exception as e:  # noqa: BLE001
            log(f"gemlite unavailable for {n}x{k}: {type(e).__name__}: {e}")
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ w64.T
        torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)  # poison the allocator block
        out = OP(x, packed, alpha, mu)
        err = rel_err(out, ref)
        if not (err < 1e-2) or torch.isnan(out).any():
            raise SystemExit(f"FAIL: ternary_linear {m}x{n}x{k} rel err {err:.3e}")
        if glite is not None:
            try:
                gl_err = rel_err(glite[0](x), ref)
            except Exception as e:  # noqa: BLE001
                log(f"gemlite failed {m}x{n}x{k}: {type(e).__name__}: {e}")
                glite = None
        t_ours = time_graph([lambda p=p: OP(x, *p) for p in tern], max(len(tern), 10))
        t_bf16 = time_graph([lambda w=w: F.linear(x, w[0]) for w in dense], max(len(dense), 10))
        t_gl = None
        if glite is not None:
            try:
                t_gl = time_graph([lambda g=g: g(x) for g in glite], max(len(glite), 10))
            except Exception as e:  # noqa: BLE001
                log(f"gemlite timing failed {m}x{n}x{k}: {type(e).__name__}: {e}")
        nbytes = packed.numel() * 4 + 2 * alpha.numel() * 2 + m * k * 2 + m * n * 2
        row = dict(N=n, K=k, M=m, err=err, gemlite_err=gl_err, t_ours=t_ours, t_bf16=t_bf16, t_gemlite=t_gl,
                   gbps=nbytes / t_ours / 1e9, frac_bw=nbytes / t_ours / PEAK_BW)
        rows.append(row)
        gl = f"{t_gl * 1e6:9.1f}" if t_gl else "      n/a"
        log(f"{n:6d}x{k:<6d} M={m:<5d} ours {t_ours * 1e6:9.1f} us  bf16 {t_bf16 * 1e6:9.1f} us  gemlite {gl} us  "
            f"{row['gbps']:7.0f} GB/s ({row['frac_bw'] * 100:4.0f}%)  x{t_bf16 / t_ours:5.2f} vs bf16  "
            f"{'x%5.2f' % (t_gl / t_ours) if t_gl else '  n/a'} vs gemlite  err {err:.1e}")
    del tern, dense, glite
    torch.cuda.empty_cache()
    return rows


def path_timings(dev, log):
    """GEMV vs GEMM kernel at small M (to choose dispatch.GEMV_MAX_M)."""
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        _, packed, alpha, mu = make_layer(n, k, dev)
        tern = copies((packed, alpha, mu), packed.numel() * 4 + alpha.numel() * 4)
        for m in [1, 2, 3, 4, 8, 16]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            res = []
            for name, fn, split in [("gemv", ternary_gemv_half2, dispatch.gemv_split(m, n, k // 128, 132)),
                                    ("gemm", ternary_gemm, dispatch.gemm_split(m, n, k // 128, 132))]:
                t = time_graph([lambda p=p: fn(x, *p, None, None, out, split=split) for p in tern], len(tern))
                res.append(f"{name} {t * 1e6:7.1f} us (split {split})")
            log(f"path {n}x{k} M={m}: " + "  ".join(res))


def copy_bandwidth(dev):
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = time_graph([lambda: b.copy_(a)], 10, replays=5)
    return 2 * a.numel() / t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-gemlite", action="store_true")
    ap.add_argument("--shapes", nargs="+", metavar="NxK", help="subset of shapes (default: all seven)")
    ap.add_argument("--ms", nargs="+", type=int, default=MS, help=f"batch sizes (default: {MS})")
    args = ap.parse_args()
    dev = torch.device("cuda")
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    import triton
    props = torch.cuda.get_device_properties(dev)
    try:
        import gemlite
        glv = getattr(gemlite, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        glv = f"not importable ({type(e).__name__}: {e})"
    log(f"GPU {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB; "
        f"torch {torch.__version__}, triton {triton.__version__}, gemlite {glv}")
    log(f"command: python3 benchmarks/bench_kernels.py {' '.join(sys.argv[1:])}")
    global PEAK_BW
    PEAK_BW = copy_bandwidth(dev)
    log(f"device-to-device copy: {PEAK_BW / 1e12:.2f} TB/s (read+write); the %BW column is of this")
    torch.manual_seed(0)
    t0 = time.time()
    if args.quick:
        path_timings(dev, log)
    shapes = SHAPES[:3] if args.quick else SHAPES
    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes]
    rows = []
    for n, k in shapes:
        rows += measure_shape(n, k, args.ms, dev, not args.no_gemlite, log)
        if os.environ.get("OUT"):  # partial results survive a time limit
            with open(os.path.join(os.environ["OUT"], "bench_kernels.json"), "w") as f:
                json.dump({"rows": rows, "log": lines}, f, indent=1)
    log(f"\n{'N x K':>13} {'M':>5} {'ours us':>9} {'bf16 us':>9} {'gemlite':>9} {'GB/s':>6} {'%BW':>4} "
        f"{'vs bf16':>7} {'vs glite':>8}")
    for r in rows:
        gl = r["t_gemlite"]
        log(f"{r['N']:6d}x{r['K']:<6d} {r['M']:5d} {r['t_ours'] * 1e6:9.1f} {r['t_bf16'] * 1e6:9.1f} "
            f"{gl * 1e6 if gl else float('nan'):9.1f} {r['gbps']:6.0f} {r['frac_bw'] * 100:4.0f} "
            f"{r['t_bf16'] / r['t_ours']:7.2f} {gl / r['t_ours'] if gl else float('nan'):8.2f}")
    for m in args.ms:
        sel = [r for r in rows if r["M"] == m]
        if not sel:
            continue
        g_b = math.exp(statistics.mean(math.log(r["t_bf16"] / r["t_ours"]) for r in sel))
        gls = [r["t_gemlite"] / r["t_ours"] for r in sel if r["t_gemlite"]]
        g_g = math.exp(statistics.mean(math.log(v) for v in gls)) if gls else float("nan")
        log(f"geomean M={m:<5d} x{g_b:5.2f} vs bf16, x{g_g:5.2f} vs gemlite ({len(gls)}/{len(sel)} shapes)")
    log(f"total {time.time() - t0:.0f} s")
    from pt2pass.lowering.kernels import gemm, gemv_half2
    for name, kern in [("gemv_half2", gemv_half2.ternary_gemv_half2_kernel), ("gemm_small", gemm._gemm_small),
                       ("gemm_large", gemm._gemm_large)]:
        for key, cfg in getattr(kern, "cache", {}).items():
            log(f"autotune {name} {key[:4]}: {cfg}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_kernels.json"), "w") as f:
            json.dump({"rows": rows, "log": lines}, f, indent=1)


if __name__ == "__main__":
    main()
