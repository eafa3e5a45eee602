"""Kernel experiment (GPU): the integer-MMA GEMV (gemv_imma.py) at M = 1-16 against bf16 F.linear
and the dispatcher of the same run.

    python3 benchmarks/experiments/sweep_gemv_imma.py [--ms 1 2 4 8 16]     # on the device machine

Correctness first: every config, 1-16 rows of x (one and two 8-row tiles), bf16 and fp16, bias,
permutation, split-K, N not a multiple of the rows per program, within 1e-2 of a float64
reference and of the dispatcher. A failure prints where the wrong outputs are (W row mod 16, x row
mod 8): a fragment-layout error shows there. Then, per shape of bench_kernels.py and M, the median
of CUDA-graph replays over >= 200 MB of rotating weights: bf16, the dispatcher, each config, and
the autotuned launcher; geometric means per M.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import pt2pass  # noqa: E402,F401
from pt2pass.bench import (checked_gpu_run, gemv_check_case, parse_shape, rel_err, rotating_layers,  # noqa: E402
                           time_graph)
from pt2pass.lowering.kernels.dispatch import _num_sms  # noqa: E402
from pt2pass.lowering.kernels.common import m_bucket  # noqa: E402
from pt2pass.lowering.kernels.gemv_imma import _IMMA, IMMA_SHAPES, imma_split, ternary_gemv_imma  # noqa: E402

OP = torch.ops.pt2pass.ternary_linear
SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]
CONFIGS = [dict(R=r, WARPS=w, NBT=nbt, num_warps=w) for r, w, nbt in IMMA_SHAPES]


def parse_config(s: str) -> dict:
    """'R,WARPS,NBT[,cg][,pfP]' -> a fixed config of ternary_gemv_imma (cg: the streamed words and
    scales loaded past L1, STREAM_CG; pfP: the L2 prefetch of P blocks, PREFETCH, default 0)."""
    r, w, nbt, *extra = s.split(",")
    config = dict(R=int(r), WARPS=int(w), NBT=int(nbt), num_warps=int(w), STREAM_CG=False, PREFETCH=0)
    for e in extra:
        if e == "cg":
            config["STREAM_CG"] = True
        elif e.startswith("pf") and e[2:].isdigit():
            config["PREFETCH"] = int(e[2:])
        else:
            raise SystemExit(f"config {s!r}: expected R,WARPS,NBT[,cg][,pfP]")
    return config


def where_wrong(out, ref) -> str:
    bad = (out.double() - ref).abs() > 0.05 * ref.abs().mean() + 1e-3
    if not bad.any():
        return "no element far off"
    rows = torch.nonzero(bad)
    return (f"{int(bad.sum())}/{bad.numel()} far off; W rows mod 16: {sorted(set((rows[:, 1] % 16).tolist()))}; "
            f"x rows: {sorted(set(rows[:, 0].tolist()))[:16]}")


def picked(m, n, k, split) -> str:
    """The autotuner's config for this call (its cache key: m bucket, N, K / 32, blocks per split)."""
    if not hasattr(_IMMA, "cache"):
        return "fixed"
    nb = k // 128
    key = next((key for key in _IMMA.cache if tuple(key[:4]) == (m_bucket(m), n, k // 32, triton.cdiv(nb, split))), None)
    return str(_IMMA.cache[key].kwargs) if key is not None else "?"


def check(dev, configs) -> bool:
    ok = True
    cases = [(1, 1000, 1152, torch.float16, True, True, 3), (3, 4096, 4096, torch.bfloat16, False, True, 1),
             (8, 11008, 4096, torch.bfloat16, True, False, 1), (9, 1000, 1152, torch.bfloat16, False, False, 2),
             (16, 4096, 11008, torch.float16, True, True, 1), (5, 200, 256, torch.bfloat16, True, False, 1)]
    for m, n, k, dt, bias, perm, split in cases:
        torch.manual_seed(m * n)
        x, packed, alpha, mu, b, p, ref = gemv_check_case(m, n, k, dt, bias, perm, dev)
        y_op = OP(x, packed, alpha, mu, b, p)
        worst = 0.0
        for cfg in configs + [None]:
            out = torch.full((m, n), float("nan"), device=dev, dtype=dt)
            ternary_gemv_imma(x, packed, alpha, mu, b, p, out, split, cfg)
            e, e_op = rel_err(out, ref), rel_err(out, y_op.double())
            worst = max(worst, e)
            if not (e < 1e-2 and e_op < 1e-2):
                ok = False
                print(f"check M={m} {n}x{k} {dt} bias={bias} perm={perm} split={split} {cfg}: rel err {e:.2e}, "
                      f"vs dispatcher {e_op:.2e} FAIL: {where_wrong(out, ref)}", flush=True)
        print(f"check M={m} {n}x{k} {dt} bias={bias} perm={perm} split={split}: worst rel err {worst:.2e} "
              f"(dispatcher {rel_err(y_op, ref):.2e})", flush=True)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--tuned-only", action="store_true",
                        help="check and time only the autotuned launcher (prints its pick), not every config")
    parser.add_argument("--configs", nargs="+", metavar="R,WARPS,NBT[,cg][,pfP]",
                        help="these configs instead of the autotune list's")
    parser.add_argument("--shapes", nargs="+", metavar="NxK", help="subset of the shapes (default: all seven)")
    parser.add_argument("--top", type=int, default=3, help="print the times of this many fastest configs")
    parser.add_argument("--splits", type=int, nargs="+",
                        help="time every config at each of these K splits (default: imma_split's; "
                             "not with --tuned-only)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the correctness check (an A/B baseline already checked elsewhere)")
    args = parser.parse_args()
    if args.splits and args.tuned_only:
        parser.error("--splits times fixed configs: leave out --tuned-only")
    configs = [] if args.tuned_only else [parse_config(c) for c in args.configs] if args.configs else CONFIGS
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else SHAPES
    dev = "cuda"
    t0 = checked_gpu_run(lambda d: args.no_check or check(d, configs), dev)
    sms = _num_sms(torch.device(dev))
    ratios = {m: {"dispatcher": [], "imma best": [], "imma tuned": []} for m in args.ms}
    for n, k in shapes:
        torch.manual_seed(0)
        dense, tern, nbytes = rotating_layers(n, k, dev)
        reps = max(len(tern), 10)
        split = imma_split(n, k // 128, sms)
        for m in args.ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            t_bf16 = time_graph([lambda w=w: F.linear(x, w[0]) for w in dense], max(len(dense), 10))
            t_op = time_graph([lambda p=p: OP(x, *p) for p in tern], reps)
            times = {f"{c} split {sp}" if args.splits else str(c):
                     time_graph([lambda p=p, c=c, sp=sp: ternary_gemv_imma(x, *p, None, None, out, sp, c)
                                 for p in tern], reps) for c in configs for sp in (args.splits or [split])}
            t_tuned = time_graph([lambda p=p: ternary_gemv_imma(x, *p, None, None, out, split) for p in tern], reps)
            t_best = min(times.values()) if times else t_tuned
            times = times or {f"tuned: {picked(m, n, k, split)}": t_tuned}
            for name, t in (("dispatcher", t_op), ("imma best", t_best), ("imma tuned", t_tuned)):
                ratios[m][name].append(t_bf16 / t)
            top = sorted(times.items(), key=lambda kv: kv[1])[:args.top]
            print(f"{n:6d}x{k:<6d} M={m:2d} bf16 {t_bf16 * 1e6:7.1f} us  dispatcher {t_op * 1e6:6.1f} "
                  f"({t_bf16 / t_op:.2f}x)  imma best {t_best * 1e6:6.1f} ({t_bf16 / t_best:.2f}x, "
                  f"{nbytes / t_best / 1e9:.0f} GB/s)  tuned {t_tuned * 1e6:6.1f}  split {split}  top "
                  + " ".join(f"{c}={t * 1e6:.1f}" for c, t in top) + f" [{time.time() - t0:.0f} s]", flush=True)
        del dense, tern
        torch.cuda.empty_cache()
    print("\n| M | dispatcher vs bf16 | imma best config vs bf16 | imma autotuned vs bf16 |\n|---|---|---|---|")
    for m, r in ratios.items():
        g = {name: math.exp(statistics.mean(math.log(v) for v in vals)) for name, vals in r.items()}
        print(f"| {m} | {g['dispatcher']:.2f}x | {g['imma best']:.2f}x | {g['imma tuned']:.2f}x |")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
