"""Kernel experiment (GPU): the fused GEMM with its MMA operands swapped (``SWAP``: y^T = W x^T,
the unpacked weight tile as the register operand A of wgmma, x^T from shared memory as B) against
the unswapped configs, the dispatcher, dequantize + cuBLAS and bf16 F.linear, M = 4 ... 2048.

    python3 benchmarks/experiments/sweep_gemm_swap.py [--ms 4 8 16 32 64 128 256 2048] [--budget 480]

Why: unswapped, the weight tile is wgmma's B operand, which must sit in shared memory: every K step
stores the unpacked tile there (STS + fence + barrier), and below BM = 64 rows of x there is no
wgmma at all (mma.sync). Swapped, the offline sm_90 build has no STS of the weight tile and wgmma
m64n16 already at 16 rows of x (benchmarks/experiments/sass.py).

Correctness first: every swapped config on bf16 / fp16 cases with bias, permutation, split-K and
N, M not multiples of the tile, within 1e-2 of float64. Then per (shape, M): median of CUDA-graph
replays over >= 200 MB of rotating weights, each config at split 1 and at the split that fills the
SMs (M <= 64), and the output of every config checked against float64. Prints a row per (shape,
M) as it goes; stops starting new shapes after ``--budget`` seconds.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import pt2pass  # noqa: E402,F401
from pt2pass.bench import (MAX_REL_ERR, checked_gpu_run, gemv_check_case, rel_err,  # noqa: E402
                           rotating_layers, time_graph)
from pt2pass.lowering.format import dequantize  # noqa: E402
from pt2pass.lowering.kernels import gemm  # noqa: E402
from pt2pass.lowering.kernels.dispatch import _num_sms  # noqa: E402

OP = torch.ops.pt2pass.ternary_linear
SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]
# the swapped configs of the library's autotune lists (BM, BN, warps, stages)
SWAPPED = [(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages) for c in gemm._SMALL_M + gemm._LARGE_M
           if c.kwargs["SWAP"]]


def cfg(bm, bn, warps, stages, swap):
    return dict(BM=bm, BN=bn, GROUP_M=8, SWAP=swap, num_warps=warps, num_stages=stages)


def unswapped():
    return [cfg(c.kwargs["BM"], c.kwargs["BN"], c.num_warps, c.num_stages, False) for c in gemm._SMALL_M + gemm._LARGE_M
            if not c.kwargs["SWAP"]]


def fill_split(m, n, nb, c, sms):
    tiles = triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"])
    return 1 if tiles >= sms else max(1, min(triton.cdiv(2 * sms, tiles), nb // 8))


def name(c):
    return f"{'S' if c['SWAP'] else 'U'}{c['BM']}x{c['BN']}w{c['num_warps']}s{c['num_stages']}"


CHECK_CASES = [(16, 1000, 1152, torch.float16, True, True, 3), (5, 4096, 4096, torch.bfloat16, False, True, 1),
               (40, 200, 256, torch.bfloat16, True, False, 1), (130, 1000, 1152, torch.float16, True, True, 1),
               (300, 4096, 2048, torch.bfloat16, False, False, 1)]


def check(dev) -> bool:
    ok = True
    for m, n, k, dt, bias, perm, split in CHECK_CASES:
        torch.manual_seed(m * n)
        x, packed, alpha, mu, b, p, ref = gemv_check_case(m, n, k, dt, bias, perm, dev)
        for bm, bn, w, st in SWAPPED:
            out = torch.full((m, n), float("nan"), device=dev, dtype=dt)
            gemm.ternary_gemm(x, packed, alpha, mu, b, p, out, split=split, config=cfg(bm, bn, w, st, True))
            err = rel_err(out, ref)
            good = err < MAX_REL_ERR and not out.isnan().any()
            ok &= good
            if not good:
                print(f"check FAIL M={m} N={n} K={k} {dt} bias={bias} perm={perm} split={split} "
                      f"{name(cfg(bm, bn, w, st, True))}: rel err {err:.2e}", flush=True)
        print(f"check M={m} N={n} K={k} {dt} bias={bias} perm={perm} split={split}: "
              f"{len(SWAPPED)} swapped configs {'pass' if ok else 'FAIL'}", flush=True)
    return ok


def measure(n, k, ms, dev, sms):
    dense, tern, nbytes = rotating_layers(n, k, dev)
    w64 = dequantize(*tern[0], dtype=torch.float64)
    nb = k // 128
    calls = max(len(tern), 10)
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ w64.T
        out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        t_bf16 = time_graph([lambda w=w: F.linear(x, w[0]) for w in dense], max(len(dense), 10))
        t_op = time_graph([lambda p=p: OP(x, *p) for p in tern], calls)
        t_deq = time_graph([lambda p=p: torch.mm(x, gemm.ternary_dequant(*p, x.dtype).t()) for p in tern], calls)
        best = {}
        for c in unswapped() + [cfg(*s, True) for s in SWAPPED]:
            if c["BM"] > max(16, 2 * m) or (m >= 256 and c["BM"] < 64):
                continue
            for split in sorted({1, fill_split(m, n, nb, c, sms)} if m <= 64 else {1}):
                gemm.ternary_gemm(x, *tern[0], None, None, out, split=split, config=c)
                err = rel_err(out, ref)
                if not err < MAX_REL_ERR:
                    print(f"FAIL {n}x{k} M={m} {name(c)} split {split}: rel err {err:.2e}", flush=True)
                    continue
                t = time_graph([lambda p=p: gemm.ternary_gemm(x, *p, None, None, out, split=split, config=c)
                                for p in tern], calls)
                key = "swapped" if c["SWAP"] else "unswapped"
                if key not in best or t < best[key][0]:
                    best[key] = (t, f"{name(c)} split {split}")
        su, ss = best.get("unswapped", (math.nan, "-")), best.get("swapped", (math.nan, "-"))
        print(f"{n:6d}x{k:<6d} M={m:<5d} bf16 {t_bf16 * 1e6:8.1f}  dispatcher {t_op * 1e6:8.1f}  "
              f"dequant+mm {t_deq * 1e6:8.1f}  unswapped {su[0] * 1e6:8.1f} ({su[1]})  "
              f"swapped {ss[0] * 1e6:8.1f} ({ss[1]})  | vs bf16: dispatcher {t_bf16 / t_op:5.2f} "
              f"swapped {t_bf16 / ss[0]:5.2f} dequant {t_bf16 / t_deq:5.2f}  swapped GB/s {nbytes / ss[0] / 1e9:6.0f}",
              flush=True)
    del dense, tern
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 2048])
    ap.add_argument("--budget", type=float, default=480.0)
    args = ap.parse_args()
    start = checked_gpu_run(check)
    sms = _num_sms(torch.device("cuda"))
    for n, k in SHAPES:
        if time.time() - start > args.budget:
            print(f"budget of {args.budget:.0f} s spent: stopping before {n}x{k}", flush=True)
            break
        measure(n, k, args.ms, "cuda", sms)
    print(f"total {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
