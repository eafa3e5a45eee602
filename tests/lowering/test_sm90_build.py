"""The batch-1 decode kernels compile for sm_90 (Hopper) with the Triton on this machine, offline.

The interpreter runs the kernels as Python and accepts code that the compiler rejects (session 7:
a tl.constexpr re-assigned in a static loop), and it cannot say whether a config spills or
whether the TMA configs really issue bulk tensor copies. benchmarks/experiments/sass.py builds
each kernel with Triton's bundled ptxas (no GPU needed) and fails on a spill or on a TMA config
without TMA loads; it must run without TRITON_INTERPRET, hence the subprocess."""
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
    assert len(rows) == 4  # dp2a and grouped GEMV, one plain-load and one TMA config each
    tma_loads = {row.split("|")[1].strip(): int(row.split("|")[4]) for row in rows}
    assert all((n > 0) == ("TMA=True" in name) for name, n in tma_loads.items())
    assert run.stdout.rstrip().endswith("0 wrong builds")
