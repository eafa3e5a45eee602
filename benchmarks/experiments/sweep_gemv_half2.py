"""Kernel experiment (GPU): the M = 1 GEMVs (bf16 x) on the seven shapes of bench_kernels.py:
gemv_half2 (x prepared in every program) and gemv_dp2a (x quantized to int16 once per call,
integer dp2a arithmetic), each over its whole autotune list, against bf16 F.linear and the
dispatcher. (Until session 7 also gemv_packed's one-row kernel, x prepacked as half2 pairs; its
last figures are in docs/results.md; gemv_dp2a beat it on all seven shapes.)

    python3 benchmarks/experiments/sweep_gemv_half2.py      # on the device machine

Same method as bench_kernels.py: correctness vs a float64 reference first (bf16 and fp16 x,
with and without permutation and bias, split-K), then the median of CUDA-graph replays cycling
through >= 200 MB of weight copies. Session 5's H200 run of this comparison is in
docs/results.md.
"""
import functools
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import pt2pass  # noqa: E402,F401  (registers torch.ops.pt2pass)
from pt2pass.bench import checked_gpu_run, gemv_check_case, rel_err, rotating_layers, time_graph  # noqa: E402
from pt2pass.lowering.kernels import gemv_dp2a, gemv_half2, gemv_packed  # noqa: E402
from pt2pass.lowering.kernels.dispatch import _num_sms  # noqa: E402
from pt2pass.lowering.kernels.gemv import gemv_split  # noqa: E402

OP = torch.ops.pt2pass.ternary_linear
SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]
PEAK = 4.8e12  # H200 datasheet (H100: 3.35)


def _configs(kernel):
    while not hasattr(kernel, "configs"):
        kernel = kernel.fn
    return [dict(BN=c.kwargs["BN"], NBT=c.kwargs["NBT"], num_warps=c.num_warps) for c in kernel.configs]


KERNELS = {"in-program x": (gemv_half2.ternary_gemv_half2, _configs(gemv_half2.ternary_gemv_half2_kernel)),
           # plain loads (session 7's kernel; TMA streaming: sweep_gemv_pipelined.py)
           "int16 x dp2a": (functools.partial(gemv_dp2a.ternary_gemv_dp2a, tma=False),
                            [dict(BN=bn, NBT=nbt, num_warps=w) for bn, nbt, w in gemv_dp2a.DP2A_SHAPES])}


def check(dev) -> bool:
    ok = True
    for n, k, dt, bias, perm, split in [(4096, 4096, torch.bfloat16, False, False, 1),
                                        (1000, 1152, torch.float16, True, True, 3),
                                        (11008, 4096, torch.bfloat16, True, True, 1),
                                        (256, 14336, torch.bfloat16, False, False, 8)]:
        torch.manual_seed(n)
        x, packed, alpha, mu, b, p, ref = gemv_check_case(1, n, k, dt, bias, perm, dev)
        for name, (fn, cfgs) in KERNELS.items():
            for cfg in cfgs[:2]:
                out = torch.full((1, n), float("nan"), device=dev, dtype=dt)
                fn(x, packed, alpha, mu, b, p, out, split=split, config=cfg)
                e = rel_err(out, ref)
                good = e < 1e-2 and not out.isnan().any()
                ok &= good
                print(f"check {name} {n}x{k} {dt} bias={bias} perm={perm} split={split} {cfg}: "
                      f"rel err {e:.2e} {'ok' if good else 'FAIL'}", flush=True)
        e_op = rel_err(OP(x, packed, alpha, mu, b, p), ref)
        ok &= e_op < 1e-2
        print(f"check dispatcher {n}x{k}: rel err {e_op:.2e}", flush=True)
    return ok


def main():
    dev = "cuda"
    t0 = checked_gpu_run(check, dev)
    sms = _num_sms(torch.device(dev))
    rows = []
    for n, k in SHAPES:
        torch.manual_seed(0)
        dense, tern, nbytes = rotating_layers(n, k, dev)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        reps = max(len(tern), 10)
        t_bf16 = time_graph([lambda w=w: F.linear(x, w[0]) for w in dense], max(len(dense), 10))
        t_op = time_graph([lambda p=p: OP(x, *p) for p in tern], reps)
        t_pre = time_graph([lambda: gemv_packed.prepack_x(x, None)], 10)
        t_quant = time_graph([lambda: gemv_dp2a.quantize_x(x, None)], 10)
        split = gemv_split(1, n, k // 128, sms)
        best = {}
        for name, (fn, cfgs) in KERNELS.items():
            times = {str(cfg): time_graph([lambda p=p: fn(x, *p, None, None, out, split, cfg) for p in tern], reps)
                     for cfg in cfgs}
            best[name] = min(times.items(), key=lambda kv: kv[1])
            print(f"   {name}:", {c: round(t * 1e6, 1) for c, t in sorted(times.items(), key=lambda kv: kv[1])},
                  flush=True)
        rows.append((t_bf16, *(t for _, t in best.values()), t_op))
        print(f"{n:6d}x{k:<6d} bf16 {t_bf16 * 1e6:7.1f} us  "
              + "  ".join(f"{name} {t * 1e6:6.1f} us ({t_bf16 / t:.2f}x, {nbytes / t / PEAK * 100:.0f}% of 4.8 TB/s)"
                          for name, (_, t) in best.items())
              + f"  dispatcher {t_op * 1e6:6.1f} us ({t_bf16 / t_op:.2f}x)  prepack alone {t_pre * 1e6:.1f} us, quantize alone {t_quant * 1e6:.1f} us"
              f"  split {split} [{time.time() - t0:.0f} s]", flush=True)
        del dense, tern
        torch.cuda.empty_cache()
    g = lambda i: math.exp(statistics.mean(math.log(r[0] / r[i]) for r in rows))  # noqa: E731
    names = list(KERNELS) + ["dispatcher"]
    print("geomean M=1 vs bf16: " + ", ".join(f"{nm} {g(i + 1):.2f}x" for i, nm in enumerate(names))
          + f" ({len(rows)} shapes); total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
