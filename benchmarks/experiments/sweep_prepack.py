"""Kernel experiment (GPU): blocks per program and warps of the x prepack (gemv_packed.prepack_x;
since session 7 the grouped GEMV's gemv_group.quantize_x_group, same launch grid), with and
without an SSR permutation, and what it does to the grouped q/k/v and gate/up GEMVs of the
LLaMA-2-7B shape at batch 1.

    PT2PASS_AUTOTUNE=0 python3 benchmarks/experiments/sweep_prepack.py     # on the device machine

Why: with a permutation the prepacked paths were ~3.5 us slower per prepack (bench_group.py,
session 6), and with 8 blocks per program K = 4096 gives only 4 programs, each gathering 1024
columns x 2 passes serially. Prepack outputs of every variant are checked against the committed
setting first (pairs and scales equal, block sums up to float32 summation order); times are medians of CUDA-graph replays (bench.time_graph).
"""
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import pt2pass  # noqa: E402,F401
from pt2pass.bench import random_ternary_layer, time_graph  # noqa: E402
from pt2pass.lowering.kernels.gemv_group import quantize_x_group as prepack_x_group  # noqa: E402
from pt2pass.lowering.kernels.common import PREPACK  # noqa: E402
from pt2pass.lowering.kernels.gemv_packed import prepack_x  # noqa: E402

GROUP = torch.ops.pt2pass.ternary_linear_group
VARIANTS = [(8, 2), (4, 2), (2, 2), (2, 1), (1, 1)]  # (NBT, num_warps): (8, 2) before session 6, (2, 1) now


def main():
    committed = dict(PREPACK)
    try:
        sweep()
    finally:
        PREPACK.update(committed)


def sweep():
    dev = "cuda"
    t0 = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    committed = dict(PREPACK)
    for k in (4096, 11008, 14336, 28672):
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        perms = [torch.randperm(k, device=dev).to(torch.int32) for _ in range(3)]
        want = {p: prepack_x(x, perms[0] if p else None) for p in (False, True)}
        want_g = prepack_x_group(x, perms)
        row = []
        for nbt, warps in VARIANTS:
            PREPACK.update(NBT=nbt, num_warps=warps)
            for got, ref in [(prepack_x(x, perms[0] if p else None), want[p]) for p in (False, True)] + [
                    (prepack_x_group(x, perms), want_g)]:
                # all but the block sums exact; those up to float32 summation order (the layout
                # of a program's tile decides it)
                assert all(torch.equal(a, b) for a, b in zip(got[:-1], ref[:-1])), (k, nbt, warps)
                torch.testing.assert_close(got[-1], ref[-1], rtol=1e-5, atol=1e-4)
            t = [time_graph([lambda: prepack_x(x, None)], 50), time_graph([lambda: prepack_x(x, perms[0])], 50),
                 time_graph([lambda: prepack_x_group(x, perms)], 50)]
            row.append(f"NBT {nbt} w{warps}: {t[0] * 1e6:.1f} / {t[1] * 1e6:.1f} / {t[2] * 1e6:.1f}")
        PREPACK.update(committed)
        print(f"K={k} prepack us (no perm / perm / 3 perms): " + " | ".join(row), flush=True)
    for name, sizes in (("7b q/k/v", [4096] * 3), ("7b gate/up", [11008] * 2)):
        k = 4096
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        members = []
        for n in sizes:
            _, packed, alpha, mu = random_ternary_layer(n, k, dev)
            members.append((packed, alpha, mu, None, torch.randperm(k, device=dev).to(torch.int32)))
        args = (x, *map(list, zip(*members)))
        row = []
        for nbt, warps in VARIANTS:
            PREPACK.update(NBT=nbt, num_warps=warps)
            row.append(f"NBT {nbt} w{warps}: {time_graph([lambda: GROUP(*args)], 50) * 1e6:.1f}")
        PREPACK.update(committed)
        print(f"{name} grouped with perms (weights L2-warm) us: " + " | ".join(row), flush=True)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
