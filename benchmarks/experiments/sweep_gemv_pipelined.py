"""Kernel experiment (GPU): the dp2a GEMV at M = 1 with plain loads (session 7's kernel), with its
K loop pipelined through cp.async (plain loads, STAGES > 1), and with TMA-streamed weight words
(gemv_dp2a.py's in-kernel descriptors, and gemv_dp2a_pipelined.py's host-built ones), against
bf16 F.linear and the dispatcher (autotuned).

    python3 benchmarks/experiments/sweep_gemv_pipelined.py      # on the device machine

Correctness first: every variant must match the plain-load kernel at the same (BN, NBT, warps)
(bit for bit in the interpreter; on the H200 the fp16 split-K case differs in the last bits, rel.
<= 5e-6, the compiler contracting the epilogue differently) and be within 1e-2 of a float64
reference (bf16 and fp16 x, bias, permutation, split-K, rows not a multiple of BN). Then, per
shape of bench_kernels.py, the median of CUDA-graph replays cycling through >= 200 MB of weight
copies for each config; the best of each variant, and geometric means.
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
import pt2pass  # noqa: E402,F401
from benchmarks.experiments.gemv_dp2a_pipelined import gemv_dp2a_host_desc, weight_descriptor  # noqa: E402
from pt2pass.bench import checked_gpu_run, gemv_check_case, rel_err, rotating_layers, time_graph  # noqa: E402
from pt2pass.lowering.kernels.dispatch import _num_sms  # noqa: E402
from pt2pass.lowering.kernels.gemv import gemv_split  # noqa: E402
from pt2pass.lowering.kernels.gemv_dp2a import DP2A_SHAPES, DP2A_TMA_SHAPES, ternary_gemv_dp2a  # noqa: E402

OP = torch.ops.pt2pass.ternary_linear
SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]
PLAIN = functools.partial(ternary_gemv_dp2a, tma=False)
TMA = functools.partial(ternary_gemv_dp2a, tma=True)
VARIANTS = {  # name: (launcher, configs)
    "plain": (PLAIN, [dict(BN=bn, NBT=nbt, num_warps=w) for bn, nbt, w in DP2A_SHAPES]),
    "cp.async": (PLAIN, [dict(BN=bn, NBT=nbt, num_warps=w, STAGES=3) for bn, nbt, w in [(8, 16, 2), (16, 8, 2)]]),
    "tma": (TMA, [dict(BN=bn, NBT=nbt, num_warps=w, STAGES=st) for bn, nbt, w, st in DP2A_TMA_SHAPES]),
    "tma host desc": (gemv_dp2a_host_desc, [dict(BN=bn, NBT=nbt, num_warps=w, STAGES=st)
                                            for bn, nbt, w, st in DP2A_TMA_SHAPES[:3]]),
}


def _base(cfg):
    return {k: cfg[k] for k in ("BN", "NBT", "num_warps")}


def check(dev) -> bool:
    ok = True
    for n, k, dt, bias, perm, split in [(1000, 1152, torch.float16, True, True, 3),
                                        (11008, 4096, torch.bfloat16, False, False, 1)]:
        torch.manual_seed(n)
        x, packed, alpha, mu, b, p, ref = gemv_check_case(1, n, k, dt, bias, perm, dev)
        for name, (fn, cfgs) in VARIANTS.items():
            for cfg in cfgs:
                out = torch.full((1, n), float("nan"), device=dev, dtype=dt)
                fn(x, packed, alpha, mu, b, p, out, split, cfg)
                same = torch.empty_like(out)
                PLAIN(x, packed, alpha, mu, b, p, same, split=split, config=_base(cfg))
                e, e_same = rel_err(out, ref), rel_err(out, same)
                good = e < 1e-2 and e_same < 1e-3
                ok &= good
                if not good or not torch.equal(out, same):
                    print(f"check {name} {n}x{k} {dt} bias={bias} perm={perm} split={split} {cfg}: rel err {e:.2e}, "
                          f"vs committed {e_same:.2e}{'' if good else ' FAIL'}", flush=True)
        print(f"check {n}x{k} {dt} bias={bias} perm={perm} split={split}: done", flush=True)
    return ok


def main():
    dev = "cuda"
    t0 = checked_gpu_run(check, dev)
    sms = _num_sms(torch.device(dev))
    rows = []
    names = list(VARIANTS) + ["dispatcher"]
    for n, k in SHAPES:
        torch.manual_seed(0)
        dense, tern, nbytes = rotating_layers(n, k, dev)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        reps = max(len(tern), 10)
        split = gemv_split(1, n, k // 128, sms)
        t_bf16 = time_graph([lambda w=w: F.linear(x, w[0]) for w in dense], max(len(dense), 10))
        best = {}
        for name, (fn, cfgs) in VARIANTS.items():
            times = {}
            for c in cfgs:
                host_desc = fn is gemv_dp2a_host_desc
                extra = [(weight_descriptor(p[0], c["BN"], c["NBT"]),) if host_desc else () for p in tern]
                times[str(c)] = time_graph([lambda p=p, c=c, e=e: fn(x, *p, None, None, out, split, c, *e)
                                            for p, e in zip(tern, extra)], reps)
            best[name] = min(times.values())
            print(f"   {name}:", {c: round(t * 1e6, 1) for c, t in sorted(times.items(), key=lambda kv: kv[1])},
                  flush=True)
        best["dispatcher"] = time_graph([lambda p=p: OP(x, *p) for p in tern], reps)
        rows.append((t_bf16, *(best[nm] for nm in names)))
        cells = [f"{nm} {best[nm] * 1e6:6.1f} us ({t_bf16 / best[nm]:.2f}x, {nbytes / best[nm] / 1e9:.0f} GB/s)"
                 for nm in names]
        print(f"{n:6d}x{k:<6d} bf16 {t_bf16 * 1e6:7.1f} us  " + "  ".join(cells)
              + f"  split {split} [{time.time() - t0:.0f} s]", flush=True)
        del dense, tern
        torch.cuda.empty_cache()
    g = lambda i: math.exp(statistics.mean(math.log(r[0] / r[i]) for r in rows))  # noqa: E731
    print("geomean M=1 vs bf16: " + ", ".join(f"{nm} {g(i + 1):.2f}x" for i, nm in enumerate(names))
          + f" ({len(rows)} shapes); total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
