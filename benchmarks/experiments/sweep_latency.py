"""Kernel experiment (GPU): the small-M GEMVs' latency hiding (common.LATENCY) on and off.

    PT2PASS_AUTOTUNE=0 python3 benchmarks/experiments/sweep_latency.py [--ms 1 4 16] [--settings 0 32 0,pdl 32,pdl]

A setting is "P[,pdl]": each GEMV program first asks L2 for the words and scales of its first P K
blocks (0: no prefetch), and with "pdl" the GEMV is launched as a programmatic dependent of its x
quantize launch. Neither may change a result: every setting is first checked **bit for bit**
against the plain launch (and within 1e-2 of float64) on cases with bias, permutation, split-K and
1-16 rows, four calls alternating two inputs (a GEMV that read x before its wait would find the
other input's values). Then, per shape of bench_kernels.py and
M, the median of CUDA-graph replays over >= 200 MB of rotating weights: bf16 and the dispatcher
(``pt2pass::ternary_linear``) under each setting, and geometric means against bf16; then the 7B
decode's grouped q/k/v and gate/up launches (``pt2pass::ternary_linear_group``, prefetch only)
against bf16 per member.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import pt2pass  # noqa: E402,F401
from pt2pass.bench import (ROTATE_BYTES, checked_gpu_run, gemv_check_case, parse_shape,  # noqa: E402
                           random_ternary_layer, rel_err, rotating_layers, time_graph)
from pt2pass.lowering.format import dequantize  # noqa: E402
from pt2pass.lowering.kernels.common import AUTOTUNE, LATENCY  # noqa: E402

OP = torch.ops.pt2pass.ternary_linear
GROUP = torch.ops.pt2pass.ternary_linear_group
# the 7B decode's grouped launches (M = 1, each member with its SSR permutation): member sizes, K
GROUPS = {"llama2-7b q/k/v": ([4096] * 3, 4096), "llama2-7b gate/up": ([11008] * 2, 4096)}
SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096), (4096, 11008)]
CASES = [(1, 4096, 4096, torch.bfloat16, True, True), (1, 11008, 4096, torch.bfloat16, False, False),
         (1, 4096, 11008, torch.float16, True, False), (1, 1000, 1152, torch.bfloat16, False, True),
         (4, 11008, 4096, torch.bfloat16, True, True), (16, 4096, 11008, torch.float16, False, True),
         (9, 1000, 1152, torch.bfloat16, True, False), (2, 8192, 8192, torch.bfloat16, False, False)]


def parse_setting(s: str) -> tuple:
    blocks, *pdl = s.split(",")
    if pdl not in ([], ["pdl"]) or int(blocks) & (int(blocks) - 1) or 0 < int(blocks) < 8:
        raise SystemExit(f"setting {s!r}: expected P or P,pdl with P 0 or a power of two >= 8")
    return int(blocks), bool(pdl)


def apply(setting: tuple) -> None:
    LATENCY["prefetch_blocks"], LATENCY["pdl"] = setting


def check(dev, settings) -> bool:
    ok = True
    for m, n, k, dt, bias, perm in CASES:
        torch.manual_seed(m * n + k)
        x, packed, alpha, mu, b, p, ref = gemv_check_case(m, n, k, dt, bias, perm, dev)
        # two inputs in turn: a GEMV reading x before its wait would find the other input's
        # quantization in the recycled buffers, not the same values
        xs = [x, torch.randn_like(x)]
        apply((0, False))
        base = [OP(xi, packed, alpha, mu, b, p) for xi in xs]
        for setting in settings:
            apply(setting)
            outs = [OP(xs[i % 2], packed, alpha, mu, b, p) for i in range(4)]
            torch.cuda.synchronize()
            same = all(torch.equal(o, base[i % 2]) for i, o in enumerate(outs))
            err = rel_err(outs[0], ref)
            ok &= same and err < 1e-2
            print(f"check M={m} {n}x{k} {dt} bias={bias} perm={perm} {setting}: rel err {err:.2e}, "
                  f"bit-equal to the plain launch: {same}" + ("" if same and err < 1e-2 else "  FAIL"), flush=True)
    for name, (sizes, k) in GROUPS.items():
        torch.manual_seed(len(name))
        group = group_members(sizes, k, dev)
        xs = [torch.randn(1, k, device=dev, dtype=torch.bfloat16) for _ in range(2)]
        x = xs[0]
        apply((0, False))
        base = [GROUP(xi, *group) for xi in xs]
        refs = [x.double()[:, p] @ dequantize(w, a.double(), u.double(), dtype=torch.float64).T
                for w, a, u, p in zip(group[0], group[1], group[2], group[4])]
        for setting in settings:
            apply(setting)
            outs = [GROUP(xs[i % 2], *group) for i in range(4)]
            same = all(torch.equal(o, b) for i, out in enumerate(outs) for o, b in zip(out, base[i % 2]))
            err = max(rel_err(o, r) for o, r in zip(outs[0], refs))
            ok &= same and err < 1e-2
            print(f"check group {name} {setting}: rel err {err:.2e}, bit-equal to the plain launch: {same}"
                  + ("" if same and err < 1e-2 else "  FAIL"), flush=True)
    apply((0, False))
    return ok


def group_members(sizes, k, dev) -> list:
    """The grouped op's member lists (packed, alpha, mu, bias, perm) of random layers with permutations."""
    layers = [random_ternary_layer(n, k, dev)[1:] for n in sizes]
    return [[lay[i] for lay in layers] for i in range(3)] + [[None] * len(sizes),
                                                             [torch.randperm(k, device=dev) for _ in sizes]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--settings", nargs="+", default=["0", "32", "0,pdl", "32,pdl", "256,pdl"],
                        metavar="P[,pdl]")
    parser.add_argument("--shapes", nargs="+", metavar="NxK", help="subset of the shapes (default: all seven)")
    args = parser.parse_args()
    settings = [parse_setting(s) for s in args.settings]
    shapes = [parse_shape(s) for s in args.shapes] if args.shapes else SHAPES
    dev = "cuda"
    t0 = checked_gpu_run(lambda d: check(d, settings), dev)
    if AUTOTUNE:
        print("autotuning on: each (shape, M) is tuned under the first setting; the integer-MMA GEMV "
              "(M = 2-16) picks its own prefetch (its configs carry PREFETCH), the others take the setting's",
              flush=True)
    ratios = {(m, s): [] for m in args.ms for s in settings}
    for n, k in shapes:
        torch.manual_seed(0)
        dense, tern, nbytes = rotating_layers(n, k, dev)
        reps = max(len(tern), 10)
        for m in args.ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t_bf16 = time_graph([lambda w=w: F.linear(x, w[0]) for w in dense], max(len(dense), 10))
            line = f"{n:6d}x{k:<6d} M={m:2d} bf16 {t_bf16 * 1e6:7.1f} us |"
            for setting in settings:
                apply(setting)
                t = time_graph([lambda p=p: OP(x, *p) for p in tern], reps)
                ratios[(m, setting)].append(t_bf16 / t)
                line += f" {setting[0]}{',pdl' if setting[1] else ''} {t * 1e6:6.1f} ({t_bf16 / t:.2f}x)"
            apply((0, False))
            print(line + f"  [{time.time() - t0:.0f} s]", flush=True)
        del dense, tern
        torch.cuda.empty_cache()
    for name, (sizes, k) in GROUPS.items():
        n_copies = max(2, int(ROTATE_BYTES // (sum(sizes) * k * 2)))
        groups = [group_members(sizes, k, dev) for _ in range(n_copies)]
        dense = [[torch.randn(n, k, device=dev, dtype=torch.bfloat16) for n in sizes] for _ in range(n_copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        t_bf16 = time_graph([lambda ws=ws: [F.linear(x, w) for w in ws] for ws in dense], max(n_copies, 10))
        line = f"group {name:18s} bf16 {t_bf16 * 1e6:7.1f} us (prefetch only, no dependent launch) |"
        for setting in settings:
            apply(setting)
            t = time_graph([lambda grp=grp: GROUP(x, *grp) for grp in groups], max(n_copies, 10))
            line += f" {setting[0]}{',pdl' if setting[1] else ''} {t * 1e6:6.1f} ({t_bf16 / t:.2f}x)"
        apply((0, False))
        print(line + f"  [{time.time() - t0:.0f} s]", flush=True)
        del groups, dense
        torch.cuda.empty_cache()
    print("\n| M | " + " | ".join(f"{s[0]}{',pdl' if s[1] else ''}" for s in settings) + " |")
    print("|---" * (len(settings) + 1) + "|")
    for m in args.ms:
        g = [math.exp(statistics.mean(math.log(v) for v in ratios[(m, s)])) for s in settings]
        print(f"| {m} | " + " | ".join(f"{v:.2f}x" for v in g) + " |")
    print(f"(geometric means vs bf16 over {len(shapes)} shapes) total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
