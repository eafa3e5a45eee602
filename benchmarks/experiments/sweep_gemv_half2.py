"""Kernel experiment (GPU): the half2 GEMV (pt2pass/lowering/kernels/gemv_half2.py) against the
committed float32 GEMV (the dispatcher at M = 1) and bf16 F.linear, on the seven shapes of
bench_kernels.py, M = 1, bf16 activations.

    python3 benchmarks/experiments/sweep_gemv_half2.py      # on the device machine

Same method as bench_kernels.py: correctness vs a float64 reference first (bf16 and fp16 x,
with and without permutation and bias, split-K), then the median of CUDA-graph replays cycling
through >= 200 MB of weight copies. Every config of the kernel's autotune list is timed.
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
from pt2pass.bench import random_ternary_layer, rel_err, rotating_copies, time_graph  # noqa: E402
from pt2pass.lowering.format import dequantize  # noqa: E402
from pt2pass.lowering.kernels import gemv_half2 as h2  # noqa: E402
from pt2pass.lowering.kernels.dispatch import _num_sms  # noqa: E402
from pt2pass.lowering.kernels.gemv import gemv_split  # noqa: E402

OP = torch.ops.pt2pass.ternary_linear
SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]
CFGS = [dict(BN=c.kwargs["BN"], NBT=c.kwargs["NBT"], num_warps=c.num_warps) for c in h2._configs()]
PEAK = 3.0e12


def check(dev) -> bool:
    ok = True
    for n, k, dt, bias, perm, split in [(4096, 4096, torch.bfloat16, False, False, 1),
                                        (1000, 1152, torch.float16, True, True, 3),
                                        (11008, 4096, torch.bfloat16, True, True, 1),
                                        (256, 14336, torch.bfloat16, False, False, 8)]:
        torch.manual_seed(n)
        _, packed, alpha, mu = random_ternary_layer(n, k, dev, scale_dtype=dt)
        x = (torch.randn(1, k, device=dev) * torch.logspace(-2, 2, k, device=dev)[torch.randperm(k, device=dev)]).to(dt)
        b = torch.randn(n, device=dev).to(dt) if bias else None
        p = torch.randperm(k, device=dev) if perm else None
        w = dequantize(packed, alpha.double(), mu.double(), dtype=torch.float64)
        ref = (x.double()[:, p] if perm else x.double()) @ w.T + (b.double() if bias else 0)
        for cfg in CFGS[:3]:
            out = torch.full((1, n), float("nan"), device=dev, dtype=dt)
            h2.ternary_gemv_half2(x, packed, alpha, mu, b, p, out, split=split, config=cfg)
            e = rel_err(out, ref)
            cur = OP(x, packed, alpha, mu, b, p)
            e_cur = rel_err(cur, ref)
            good = e < 1e-2
            ok &= good
            print(f"check {n}x{k} {dt} bias={bias} perm={perm} split={split} {cfg}: rel err {e:.2e} "
                  f"(committed {e_cur:.2e}) {'ok' if good else 'FAIL'}", flush=True)
    return ok


def main():
    dev = "cuda"
    t0 = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if not check(dev):
        print("correctness FAILED: no timing")
        return
    sms = _num_sms(torch.device(dev))
    rows = []
    for n, k in SHAPES:
        torch.manual_seed(0)
        _, packed, alpha, mu = random_ternary_layer(n, k, dev)
        dense = rotating_copies((torch.randn(n, k, device=dev, dtype=torch.bfloat16),), n * k * 2)
        nbytes = packed.numel() * 4 + alpha.numel() * 4
        tern = rotating_copies((packed, alpha, mu), nbytes)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        reps = max(len(tern), 10)
        t_bf16 = time_graph([lambda w=w: F.linear(x, w[0]) for w in dense], max(len(dense), 10))
        t_cur = time_graph([lambda p=p: OP(x, *p) for p in tern], reps)
        split = gemv_split(1, n, k // 128, sms)
        times = {}
        for cfg in CFGS:
            times[str(cfg)] = time_graph([lambda p=p: h2.ternary_gemv_half2(x, *p, None, None, out, split, cfg)
                                          for p in tern], reps)
        best = min(times.items(), key=lambda kv: kv[1])
        rows.append((n, k, t_bf16, t_cur, best[1]))
        print(f"{n:6d}x{k:<6d} bf16 {t_bf16 * 1e6:7.1f} us  committed {t_cur * 1e6:7.1f} us ({t_bf16 / t_cur:.2f}x)  "
              f"half2 {best[1] * 1e6:7.1f} us ({t_bf16 / best[1]:.2f}x, {nbytes / best[1] / PEAK * 100:.0f}% of 3 TB/s) "
              f"{best[0]} split {split} [{time.time() - t0:.0f} s]", flush=True)
        print("   all:", {c: round(t * 1e6, 1) for c, t in sorted(times.items(), key=lambda kv: kv[1])}, flush=True)
        del dense, tern
        torch.cuda.empty_cache()
    g = lambda i: math.exp(statistics.mean(math.log(r[2] / r[i]) for r in rows))  # noqa: E731
    print(f"geomean M=1 vs bf16: committed {g(3):.2f}x, half2 {g(4):.2f}x ({len(rows)} shapes); total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
