"""Why is the eager ternary prefill slower than its GPU time? CPU cost per op call (GPU).

    python3 benchmarks/experiments/eager_overhead.py

Times the CPU side of eager pt2pass::ternary_linear calls at M = 2048 (dequantize + cuBLAS path)
and M = 1 (GEMV) against F.linear, then prints a cProfile of the op calls.
"""
import cProfile
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import pt2pass  # noqa: E402,F401
from pt2pass.bench import random_ternary_layer  # noqa: E402

OP = torch.ops.pt2pass.ternary_linear


def cpu_us(fn, n=200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    cpu = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return cpu * 1e6


def main():
    dev = "cuda"
    _, packed, alpha, mu = random_ternary_layer(1024, 4096, dev)
    w = torch.randn(1024, 4096, device=dev, dtype=torch.bfloat16)
    for m in (1, 2048):
        x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
        print(f"M={m}: F.linear {cpu_us(lambda: F.linear(x, w)):.1f} us CPU per call, "
              f"ternary op {cpu_us(lambda: OP(x, packed, alpha, mu)):.1f} us", flush=True)
    for m in (1, 2048):
        x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            OP(x, packed, alpha, mu)
        prof.disable()
        torch.cuda.synchronize()
        print(f"--- M={m}")
        pstats.Stats(prof).sort_stats(sys.argv[1] if len(sys.argv) > 1 else "tottime").print_stats(28)


if __name__ == "__main__":
    main()
