"""Kernel experiment (GPU): batch 1 with x quantized inside the dp2a GEMVs (``fuse_x``) against
the quantize launch before them, single and grouped, on the benchmark shapes and the 7B groups.

    python3 benchmarks/experiments/sweep_fuse_x.py        # on the device machine

Correctness first: fused and launched against a float64 reference (bf16 / fp16, bias,
permutation, split-K, 1-2 rows of x, the grouped kernel with a permutation per member) and
against each other (the same integers; only the float order of the block sums of x may differ).
Then the median of CUDA-graph replays over >= 200 MB of rotating weights (bench.time_graph),
bf16 x, both autotuned: bf16 F.linear, the half2 GEMV (the dispatcher's pick below
DP2A_MIN_WEIGHTS), dp2a with the launch, dp2a fused; the groups with and without SSR permutations.
"""
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pt2pass  # noqa: E402,F401
from bench_group import GROUPS, members  # noqa: E402
from pt2pass.bench import checked_gpu_run, gemv_check_case, rel_err, rotating_copies, rotating_layers, time_graph  # noqa: E402
from pt2pass.lowering.kernels.dispatch import _num_sms  # noqa: E402
from pt2pass.lowering.kernels.gemv import gemv_split  # noqa: E402
from pt2pass.lowering.kernels.gemv_dp2a import ternary_gemv_dp2a  # noqa: E402
from pt2pass.lowering.kernels.gemv_group import ternary_gemv_group  # noqa: E402
from pt2pass.lowering.kernels.gemv_half2 import ternary_gemv_half2  # noqa: E402
from pt2pass.lowering.reference import ternary_linear_reference  # noqa: E402

SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]


def check(dev) -> bool:
    ok = True
    for m, n, k, dt, bias, perm, split in [(1, 4096, 4096, torch.bfloat16, True, True, 1),
                                           (1, 1000, 1152, torch.float16, False, True, 3),
                                           (2, 11008, 4096, torch.bfloat16, True, False, 1),
                                           (1, 4096, 11008, torch.float16, False, False, 2)]:
        torch.manual_seed(n + k)
        x, packed, alpha, mu, b, p, ref = gemv_check_case(m, n, k, dt, bias, perm, dev)
        outs = []
        for fuse in (False, True):
            out = torch.full((m, n), float("nan"), device=dev, dtype=dt)
            outs.append(ternary_gemv_dp2a(x, packed, alpha, mu, b, p, out, split, fuse_x=fuse))
        errs = [rel_err(o, ref) for o in outs]
        diff = (outs[0].float() - outs[1].float()).abs().max().item()
        good = max(errs) < 1e-2 and diff <= 1e-2 * outs[0].float().abs().max().item()
        ok &= good
        print(f"check dp2a M={m} {n}x{k} {dt} bias={bias} perm={perm} split={split}: rel err launched "
              f"{errs[0]:.2e} fused {errs[1]:.2e}, max |fused - launched| {diff:.2e} {'ok' if good else 'FAIL'}",
              flush=True)
    for name, (sizes, k) in GROUPS.items():
        torch.manual_seed(len(name))
        group = members(sizes, k, dev, bias=True, perm=True)
        x = (torch.randn(1, k, device=dev) * torch.logspace(-2, 2, k, device=dev)).to(torch.bfloat16)
        got = [ternary_gemv_group(x, *map(list, zip(*group)), fuse_x=fuse) for fuse in (False, True)]
        errs = []
        for i, (packed, alpha, mu, b, p) in enumerate(group):
            ref = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double(), b.double(), p)
            errs += [rel_err(got[0][i], ref), rel_err(got[1][i], ref)]
        good = max(errs) < 1e-2
        ok &= good
        print(f"check group {name}: worst rel err {max(errs):.2e} {'ok' if good else 'FAIL'}", flush=True)
    return ok


def geomean(vals):
    return math.exp(statistics.mean(math.log(v) for v in vals))


def main():
    dev = "cuda"
    checked_gpu_run(check, dev)
    sms = _num_sms(torch.device(dev))
    print("\n| N x K | bf16 | half2 | dp2a + quantize launch | dp2a, x quantized inside | fused vs launched | "
          "best vs bf16 |\n|---|---|---|---|---|---|---|", flush=True)
    gains, best = [], []
    for n, k in SHAPES:
        torch.manual_seed(0)
        dense, tern, _ = rotating_layers(n, k, dev)
        reps = max(len(tern), 10)
        split = gemv_split(1, n, k // 128, sms)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        t = {"bf16": time_graph([lambda w=w: F.linear(x, w[0]) for w in dense], max(len(dense), 10)),
             "half2": time_graph([lambda p=p: ternary_gemv_half2(x, *p, None, None, out, split) for p in tern], reps)}
        for fuse in (False, True):
            t[fuse] = time_graph([lambda p=p, f=fuse: ternary_gemv_dp2a(x, *p, None, None, out, split, fuse_x=f)
                                  for p in tern], reps)
        gains.append(t[False] / t[True])
        best.append(t["bf16"] / min(t["half2"], t[False], t[True]))
        print(f"| {n}x{k} | {t['bf16'] * 1e6:.1f} | {t['half2'] * 1e6:.1f} | {t[False] * 1e6:.1f} | "
              f"{t[True] * 1e6:.1f} | {gains[-1]:.2f}x | {best[-1]:.2f}x |", flush=True)
        del dense, tern
        torch.cuda.empty_cache()
    print(f"geomean: fused vs launched {geomean(gains):.2f}x, best of the three vs bf16 {geomean(best):.2f}x")
    print("\n| group (batch 1) | perm | launched (us) | fused (us) | fused vs launched |\n|---|---|---|---|---|")
    for name, (sizes, k) in GROUPS.items():
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        for perm in (True, False):
            group = [mem[:3] + (None, mem[4]) for mem in members(sizes, k, dev, perm=perm)]
            nbytes = sum(p.numel() * 4 + a.numel() * 4 for p, a, *_ in group)
            sets = rotating_copies([t for mem in group for t in mem[:3]], nbytes)
            perms = [mem[4] for mem in group]
            bias = [None] * len(sizes)
            t = {fuse: time_graph([lambda s=s, f=fuse: ternary_gemv_group(x, list(s[0::3]), list(s[1::3]),
                                                                          list(s[2::3]), bias, perms, fuse_x=f)
                                   for s in sets], max(len(sets), 10)) for fuse in (False, True)}
            print(f"| {name} | {perm} | {t[False] * 1e6:.1f} | {t[True] * 1e6:.1f} | {t[False] / t[True]:.2f}x |",
                  flush=True)
            del sets
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
