"""Nsight Compute counters of the ternary kernels and of bf16 cuBLAS on chosen (N x K, M) cases.

    bash benchmarks/gpu_checklist.sh ncu        # profiles the default cases, prints the table

Issue 4 asks, for every missed target, for "the profile that shows it": the CUDA-graph timings say
how long a kernel takes, these counters say what bounds it (DRAM throughput against the SMs',
issue-slot use, occupancy, the top warp stall reasons).

Two modes:
- ``run``: warms every case up outside any NVTX range (autotuning, compiles), then runs each
  case's ``pt2pass::ternary_linear`` and ``F.linear`` once inside the range ``prof``, each case
  led by a ``torch.cuda._sleep`` marker launch (``spin_kernel``) so that the rows of the report
  can be matched to the cases. Meant to run under
  ``ncu --nvtx --nvtx-include "prof/" --clock-control none --section ... -o REPORT``;
  ncu flushes the caches before each replayed pass, so every kernel reads its weight from DRAM.
- ``summary RAW.csv``: reads ``ncu --import REPORT --csv --page raw`` and prints one line per
  profiled kernel (case, time, DRAM and SM throughput, registers, occupancy, issue use, the
  busiest pipe, the three largest stall reasons).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from pt2pass.bench import parse_shape  # noqa: E402

DEFAULT_CASES = ["28672x8192:1", "4096x4096:1", "11008x4096:1", "28672x8192:4", "28672x8192:16",
                 "4096x4096:16", "28672x8192:256", "4096x4096:256", "4096x4096:2048"]
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"
MARKER = "spin_kernel"


def parse_case(s: str):
    """'NxK:M' -> (N, K, M)."""
    shape, m = s.split(":")
    return (*parse_shape(shape), int(m))


def run(cases):
    import torch
    import torch.nn.functional as F

    import pt2pass  # noqa: F401  (registers the op)
    from pt2pass.bench import random_ternary_layer, rel_err
    from pt2pass.lowering.format import dequantize

    dev = torch.device("cuda")
    op = torch.ops.pt2pass.ternary_linear
    torch.manual_seed(0)
    prepared = []
    for n, k, m in cases:
        _, packed, alpha, mu = random_ternary_layer(n, k, dev)
        w = dequantize(packed, alpha.double(), mu.double(), dtype=torch.float64)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        err = rel_err(op(x, packed, alpha, mu), x.double() @ w.T)  # also autotunes, outside the range
        w16 = w.to(torch.bfloat16)
        del w
        F.linear(x, w16)
        print(f"case {n}x{k} M={m}: rel err {err:.1e}", flush=True)
        if not err < 1e-2:
            raise SystemExit(f"FAIL: {n}x{k} M={m} rel err {err:.3e}")
        prepared.append((x, packed, alpha, mu, w16))
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    for x, packed, alpha, mu, w16 in prepared:
        torch.cuda._sleep(1000)
        op(x, packed, alpha, mu)
        F.linear(x, w16)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


_SCALE = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "nsecond": 1e-3, "usecond": 1, "us": 1,
          "msecond": 1e3, "ms": 1e3, "ns": 1e-3}
PIPES = ("alu", "fma", "fmaheavy", "shared", "tensor_op_hmma", "tensor_op_imma", "tma")


def _num(v: str):
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return None


def summary(path: str, cases):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # ncu's raw CSV: a header row of metric names, a row of units, then one row per kernel
    head, units, body = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(head)}

    def get(r, name, scaled=False):
        i = col.get(name)
        v = _num(r[i]) if i is not None and i < len(r) else None
        return v * _SCALE.get(units[i], 1) if scaled and v is not None else v

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    stalls = [h for h in head if h.startswith(STALL_PREFIX) and h.endswith(STALL_SUFFIX)
              and "not_issued" not in h]
    print(f"{'case':<17} {'kernel':<30} {'grid':>13} {'blk':>5} {'us':>7} {'GB/s':>6} {'DRAM%':>5} {'SM%':>5} "
          f"{'L1%':>5} {'regs':>4} {'occ%':>5} {'issue%':>6} {'busiest pipe':>16}  top stalls (warps per issued instr)")
    case_i = -1
    for r in body:
        name = r[col["Kernel Name"]]
        if MARKER in name:
            case_i += 1
            continue
        n, k, m = cases[case_i] if 0 <= case_i < len(cases) else (0, 0, 0)
        t_us = get(r, "gpu__time_duration.sum", scaled=True)
        moved = sum(get(r, f"dram__bytes_{d}.sum", scaled=True) or 0 for d in ("read", "write"))
        gbps = moved / (t_us * 1e3) if t_us else None
        pipes = [(get(r, f"sm__pipe_{p}_cycles_active.avg.pct_of_peak_sustained_active") or 0.0, p) for p in PIPES]
        pipe_v, pipe = max(pipes)
        top = sorted(((get(r, s) or 0.0, s[len(STALL_PREFIX):-len(STALL_SUFFIX)]) for s in stalls), reverse=True)[:3]
        short = name.split("(")[0].replace("void ", "")[-30:]
        print(f"{f'{n}x{k} M={m}':<17} {short:<30} {r[col['Grid Size']]:>13} {r[col['Block Size']]:>5} "
              f"{fmt(t_us, '7.1f')} {fmt(gbps, '6.0f')} "
              f"{fmt(get(r, 'gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed'), '5.1f')} "
              f"{fmt(get(r, 'sm__throughput.avg.pct_of_peak_sustained_elapsed'), '5.1f')} "
              f"{fmt(get(r, 'l1tex__throughput.avg.pct_of_peak_sustained_active'), '5.1f')} "
              f"{fmt(get(r, 'launch__registers_per_thread'), '4.0f')} "
              f"{fmt(get(r, 'sm__warps_active.avg.pct_of_peak_sustained_active'), '5.1f')} "
              f"{fmt(get(r, 'smsp__issue_active.avg.pct_of_peak_sustained_active'), '6.1f')} "
              f"{f'{pipe} {pipe_v:.0f}%':>16}  " + " ".join(f"{s} {v:.1f}" for v, s in top))
    print("(us: kernel duration; GB/s: DRAM bytes read + written over it; DRAM%, SM%: of peak, elapsed; "
          "L1%: of peak while active; occ%: achieved warps of the maximum; busiest pipe: % of its peak while active)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["run", "summary"])
    ap.add_argument("csv", nargs="?", help="summary: ncu's raw CSV export")
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="NxK:M")
    args = ap.parse_args()
    cases = [parse_case(c) for c in args.cases]
    if args.mode == "run":
        run(cases)
    else:
        if not args.csv:
            ap.error("summary needs the CSV path")
        summary(args.csv, cases)


if __name__ == "__main__":
    main()
