"""Fuzz the ternary_linear kernels on CUDA against a float64 reference of the dequantized weight.

    python3 benchmarks/fuzz_kernels.py                  # 256 cases, N, K <= 8192, M <= 4096
    python3 benchmarks/fuzz_kernels.py --cases 1000 --seed 7
    python3 benchmarks/fuzz_kernels.py --no-autotune    # one fixed config per path (faster)
    TRITON_INTERPRET=1 python3 benchmarks/fuzz_kernels.py --device cpu --small --cases 10

Cases come from ``pt2pass.lowering.kernels.fuzz`` (the generator tests/lowering/test_fuzz.py uses
on CPU): every dispatcher path (GEMV, GEMM with in-kernel gather, split-K GEMM, GEMM, dequantize
+ cuBLAS), any N, K a multiple of 16, fp32/bf16/fp16 x in 2-D or 3-D and three layouts, bias,
permutation, three scale dtypes. Prints one line per failure, then "P/N passed" with the largest
relative error per dtype; exits with 1 on any failure. Needs only torch and pt2pass.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=256, help="number of random cases (default 256)")
    p.add_argument("--seed", type=int, default=5, help="seed of the case generator (default 5: its 256 cases reach every GPU path)")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu with TRITON_INTERPRET=1")
    p.add_argument("--small", action="store_true", help="the interpreter-sized profile")
    p.add_argument("--no-autotune", action="store_true",
                   help="PT2PASS_AUTOTUNE=0: one fixed config per path instead of autotuning")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_autotune:  # read when the kernels are imported
        os.environ["PT2PASS_AUTOTUNE"] = "0"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch

    from pt2pass.lowering.kernels.fuzz import LARGE, SMALL, TOLERANCE, draw_cases, run_case

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    cases = draw_cases(args.cases, args.seed, SMALL if args.small else LARGE)
    worst = {dtype: 0.0 for dtype in TOLERANCE}
    failures = 0
    start = time.perf_counter()
    for i, case in enumerate(cases):
        try:
            err, problem = run_case(case, args.device)
        except Exception as exc:  # noqa: BLE001 - a crash is a failure of that case, keep going
            err, problem = float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if problem is None:
            worst[case.dtype] = max(worst[case.dtype], err)
        else:
            failures += 1
            print(f"FAIL case {i}: {case.describe()}: {problem}", flush=True)
        if (i + 1) % 50 == 0:
            print(f"... {i + 1}/{len(cases)} cases, {failures} failed, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the float64 references of 8192 x 8192 layers are large
    summary = ", ".join(f"{str(d).replace('torch.', '')} {e:.2e} (tol {TOLERANCE[d]:.2g})"
                        for d, e in worst.items())
    print(f"{len(cases) - failures}/{len(cases)} passed, max rel err per dtype: {summary}; "
          f"{time.perf_counter() - start:.0f} s on {args.device}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
