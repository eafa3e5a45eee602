"""Kernel experiment (GPU): the prepacked half2 GEMV for several rows of x
(pt2pass/lowering/kernels/gemv_packed.py, ternary_gemv_packed_rows_kernel: each word decoded once,
multiplied with BM rows) and its int16-x dp2a counterpart (gemv_dp2a_rows.py here, session 7, not
yet timed) against the tensor-core GEMM and bf16 F.linear, on the seven shapes of
bench_kernels.py, M = 2, 4, 8, bf16 activations.

    python3 benchmarks/experiments/sweep_gemv_rows.py      # on the device machine

The dispatcher uses it at M = 2 only (BM = MAX_ROWS = 2); this script also times BM = 4, which
lost to the GEMM (session 5, docs/results.md), by setting MAX_ROWS. Same method as
bench_kernels.py: correctness vs float64 first, then the median of CUDA-graph replays cycling
through >= 200 MB of weight copies.
"""
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import pt2pass  # noqa: E402,F401  (registers torch.ops.pt2pass)
from pt2pass.bench import checked_gpu_run, gemv_check_case, rel_err, rotating_layers, time_graph  # noqa: E402
from pt2pass.lowering.kernels import gemv_packed  # noqa: E402
from pt2pass.lowering.kernels.dispatch import _num_sms  # noqa: E402
from pt2pass.lowering.kernels.gemm import gemm_split, ternary_gemm  # noqa: E402
from pt2pass.lowering.kernels.gemv import gemv_split  # noqa: E402
from gemv_dp2a_rows import ternary_gemv_dp2a_rows  # noqa: E402

SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]
MS = [2, 4, 8]
# (BM, BN, NBT, warps): no spills in the sm_90 build (checked offline)
CANDIDATES = {2: [(2, 16, 8, 2), (2, 32, 8, 4), (2, 16, 16, 4)],
              4: [(4, 16, 4, 4), (4, 32, 4, 4), (4, 8, 4, 2), (2, 16, 8, 2), (2, 32, 8, 4)],
              8: [(4, 16, 4, 4), (4, 32, 4, 4), (4, 8, 4, 2)]}
# the dp2a rows kernel: <= 168 registers in the sm_90 build (offline, session 7)
DP2A_CANDIDATES = {2: [(2, 16, 8, 4), (2, 8, 8, 2), (2, 8, 16, 2)],
                   4: [(4, 16, 4, 4), (4, 8, 4, 4), (4, 8, 4, 2), (2, 16, 8, 4)],
                   8: [(8, 8, 4, 4), (4, 16, 4, 4), (4, 8, 4, 4)]}


def run_rows(x, packed, alpha, mu, bias, perm, out, split, bm, cfg):
    gemv_packed.MAX_ROWS = bm
    try:
        return gemv_packed.ternary_gemv_packed(x, packed, alpha, mu, bias, perm, out, split, cfg)
    finally:
        gemv_packed.MAX_ROWS = 2


def check(dev) -> bool:
    ok = True
    for m, n, k, dt, bias, perm, split in [(2, 4096, 4096, torch.bfloat16, False, False, 1),
                                           (3, 1000, 1152, torch.float16, True, True, 3),
                                           (8, 11008, 4096, torch.bfloat16, True, True, 1),
                                           (5, 256, 14336, torch.bfloat16, False, False, 8)]:
        torch.manual_seed(n + m)
        x, packed, alpha, mu, b, p, ref = gemv_check_case(m, n, k, dt, bias, perm, dev)
        for name, fn, (bm, bn, nbt, nw) in [("half2", run_rows, CANDIDATES[4][0]), ("half2", run_rows, CANDIDATES[2][0]),
                                            ("dp2a", ternary_gemv_dp2a_rows, DP2A_CANDIDATES[4][0]),
                                            ("dp2a", ternary_gemv_dp2a_rows, DP2A_CANDIDATES[2][0])]:
            out = torch.full((m, n), float("nan"), device=dev, dtype=dt)
            fn(x, packed, alpha, mu, b, p, out, split, bm, dict(BN=bn, NBT=nbt, num_warps=nw))
            e = rel_err(out, ref)
            good = e < 1e-2 and not out.isnan().any()
            ok &= good
            print(f"check {name} M={m} {n}x{k} {dt} bias={bias} perm={perm} split={split} BM={bm}: "
                  f"rel err {e:.2e} {'ok' if good else 'FAIL'}", flush=True)
    return ok


def main():
    dev = "cuda"
    t0 = checked_gpu_run(check, dev)
    sms = _num_sms(torch.device(dev))
    best = {m: [] for m in MS}
    for n, k in SHAPES:
        torch.manual_seed(0)
        dense, tern, _ = rotating_layers(n, k, dev)
        reps = max(len(tern), 10)
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            t_bf16 = time_graph([lambda w=w: F.linear(x, w[0]) for w in dense], max(len(dense), 10))
            gsplit = gemm_split(m, n, k // 128, sms)
            t_gemm = time_graph([lambda p=p: ternary_gemm(x, *p, None, None, out, split=gsplit) for p in tern], reps)
            found = []
            for fn, candidates in ((run_rows, CANDIDATES[m]), (ternary_gemv_dp2a_rows, DP2A_CANDIDATES[m])):
                times = {}
                for bm, bn, nbt, nw in candidates:
                    cfg = dict(BN=bn, NBT=nbt, num_warps=nw)
                    split = gemv_split(triton.cdiv(m, bm), n, k // 128, sms)
                    times[f"BM{bm} {bn}/{nbt}/{nw} s{split}"] = time_graph(
                        [lambda p=p: fn(x, *p, None, None, out, split, bm, cfg) for p in tern], reps)
                found.append(min(times.items(), key=lambda kv: kv[1]))
            (name, t_new), (dname, t_dp2a) = found
            best[m].append((t_bf16, t_gemm, t_new, t_dp2a))
            print(f"{n:6d}x{k:<6d} M={m:<3d} bf16 {t_bf16 * 1e6:7.1f} us  GEMM {t_gemm * 1e6:7.1f} us "
                  f"({t_bf16 / t_gemm:.2f}x)  half2 rows {t_new * 1e6:7.1f} us ({t_bf16 / t_new:.2f}x) {name}  "
                  f"dp2a rows {t_dp2a * 1e6:7.1f} us ({t_bf16 / t_dp2a:.2f}x) {dname} [{time.time() - t0:.0f} s]",
                  flush=True)
        del dense, tern
        torch.cuda.empty_cache()
    for m in MS:
        g = lambda i: math.exp(statistics.mean(math.log(r[0] / r[i]) for r in best[m]))  # noqa: E731
        print(f"geomean M={m} vs bf16: GEMM {g(1):.2f}x, half2 rows (best config) {g(2):.2f}x, "
              f"dp2a rows {g(3):.2f}x")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
