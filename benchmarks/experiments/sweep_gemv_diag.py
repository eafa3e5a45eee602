"""Kernel experiment (GPU), second sweep: why the x-stationary GEMV stays near 1 TB/s at M = 1.

    python3 benchmarks/experiments/sweep_gemv_diag.py     # on the device machine

Times (same method as sweep_gemv.py) on four shapes: a plain contiguous stream of the packed
words (the bandwidth Triton reaches on this buffer), the x-stationary loop with its arithmetic
removed (LOAD_ONLY: the access pattern alone), and the full kernel with the words staged through
shared memory by Triton's pipeliner (tl.range num_stages = 3..6) or a register prefetch.
"""
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from pt2pass.bench import random_ternary_layer, rel_err, rotating_copies, time_graph  # noqa: E402
from pt2pass.lowering.format import dequantize  # noqa: E402
import gemv_prescaled as gp  # noqa: E402

SHAPES = [(28672, 8192), (8192, 28672), (4096, 4096), (11008, 4096)]
PEAK = 3.0e12


@triton.jit
def stream_kernel(w_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.int32)
    for it in range(ITERS):
        offs = (pid * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def stream(packed, out, block, iters, warps):
    n = packed.numel()
    grid = triton.cdiv(n, block * iters)
    stream_kernel[(grid,)](packed, out, n, BLOCK=block, ITERS=iters, num_warps=warps)


CFGS = []
for bn, nbt, w in [(4, 8, 1), (8, 8, 1), (4, 16, 1), (8, 16, 2), (16, 8, 2)]:
    for rows in (16, 32, 64):
        if rows % bn:
            continue
        CFGS.append((bn, nbt, rows, w, True, 1))
        for st in (3, 4, 6):
            CFGS.append((bn, nbt, rows, w, False, st))


def main():
    dev = "cuda"
    t0 = time.time()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for n, k in SHAPES:
        torch.manual_seed(0)
        _, packed, alpha, mu = random_ternary_layer(n, k, dev)
        nbytes = packed.numel() * 4 + alpha.numel() * 4
        tern = rotating_copies((packed, alpha, mu), nbytes)
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ dequantize(packed, alpha.double(), mu.double(), dtype=torch.float64).T
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        sink = torch.empty(1 << 24, device=dev, dtype=torch.int32)
        res = []
        for block, iters, warps in [(1024, 4, 4), (2048, 8, 8), (4096, 4, 8), (512, 16, 4)]:
            t = time_graph([lambda p=p: stream(p[0], sink, block, iters, warps) for p in tern], max(len(tern), 10))
            res.append((t, f"stream {block}x{iters} w{warps}"))
        print(f"{n}x{k}: words only {packed.numel() * 4 / 1e6:.1f} MB; streams:",
              [(f"{t * 1e6:.1f} us {packed.numel() * 4 / t / 1e12:.2f} TB/s", d) for t, d in res], flush=True)
        timings = []
        for cfg in CFGS:
            for load_only in (False, True):
                if load_only and cfg[4] is False and cfg[5] != 4:
                    continue
                if not load_only:
                    out.fill_(float("nan"))
                    gp.gemv_xstat(x, packed, alpha, mu, None, None, out, cfg)
                    err = rel_err(out, ref)
                    if not err < 1e-2:
                        print("FAIL", cfg, err, flush=True)
                        continue
                t = time_graph([lambda p=p: gp.gemv_xstat(x, *p, None, None, out, cfg, load_only=load_only)
                                for p in tern], max(len(tern), 10))
                timings.append((t, load_only, cfg))
        for lo in (False, True):
            sel = sorted([(t, c) for t, l, c in timings if l == lo])
            print(f"  {'LOAD_ONLY' if lo else 'full     '} best:",
                  [(f"{t * 1e6:.1f} us {nbytes / t / PEAK * 100:.0f}%", c) for t, c in sel[:6]], flush=True)
        print("  all:", [(f"{t * 1e6:.1f}", int(l), c) for t, l, c in timings], f"[{time.time() - t0:.0f} s]", flush=True)
        del tern
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
