"""The batch-1 decode kernels compile for sm_90 (Hopper) with the Triton on this machine, offline.

The interpreter runs the kernels as Python and accepts code that the compiler rejects (session 7:
a tl.constexpr re-assigned in a static loop), and it cannot say whether a config spills or
whether the TMA configs really issue bulk tensor copies. benchmarks/experiments/sass.py builds
each kernel with Triton's bundled ptxas (no GPU needed) and fails on a spill, on a TMA config
without TMA loads, on a GEMM config without wgmma where its tile allows it, or on an integer-MMA GEMV without IMMA instructions or whose inline-asm MMAs
do not get one tensor element per lane (their fragment layout); it must run without
TRITON_INTERPRET, hence the subprocess."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_decode_kernels_build_for_sm90_without_spills_and_with_tma_loads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "experiments" / "sass.py"), "--quick"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ternary_gemv")]
    # dp2a GEMV and grouped GEMV (with and without the RMSNorm factor), one plain-load and one TMA
    # config each; the integer-MMA GEMV, 1 and 2 x tiles
    assert len(rows) == 8 and sum("NORM=True" in row for row in rows) == 2
    cells = {row.split("|")[1].strip(): [int(c) for c in row.split("|")[4:6]] for row in rows}
    assert all((tma > 0) == ("TMA=True" in name) for name, (tma, _) in cells.items())
    assert all((mma > 0) == ("imma" in name) for name, (_, mma) in cells.items())
    # the decode attention kernels and the fused add + RMSNorm + quantize launch too
    assert "| _add_norm_quantize_kernel |" in run.stdout
    assert all(f"| decode_attention._decode_attention_{name} |" in run.stdout
               for name in ("split_kernel MASK=1 warps=4", "split_kernel MASK=2 warps=4",
                            "split_kernel MASK=1 warps=2", "split_kernel MASK=2 warps=2", "combine_kernel"))
    # the fused GEMM with swapped operands (one small-M and one large-M config): wgmma, and the
    # unpacked weight tile stays in registers (no shared-memory stores of it)
    gemm = [row.split("|") for row in run.stdout.splitlines() if row.startswith("| ternary_gemm_kernel")]
    assert len(gemm) == 2 and all("SWAP=True" in row[1] for row in gemm)
    assert all(int(row[7]) > 0 and int(row[8]) <= 4 for row in gemm)
    assert run.stdout.rstrip().endswith("0 wrong builds")
