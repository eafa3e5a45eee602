"""The batch-1 decode kernels compile for sm_90 (Hopper) with the Triton on this machine, offline.

The interpreter runs the kernels as Python and accepts code that the compiler rejects (session 7:
a tl.constexpr re-assigned in a static loop), and it cannot say whether a config spills or
whether the TMA configs really issue bulk tensor copies. benchmarks/experiments/sass.py builds
each kernel with Triton's bundled ptxas (no GPU needed) and fails on a spill, on a TMA config
without TMA loads, on a GEMM config (dense or MoE experts) without wgmma where its tile allows it, or on an integer-MMA GEMV without IMMA instructions or whose inline-asm MMAs
do not get one tensor element per lane (their fragment layout), or whose latency hiding (L2
prefetch, dependent launch) is missing or in the wrong order; it must run without
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
    # the grouped MoE experts GEMM at both row tiles (wgmma from 64 rows; spills fail the build)
    experts = [row.split("|") for row in run.stdout.splitlines() if row.startswith("| ternary_experts_kernel")]
    assert len(experts) == 2 and [int(row[7]) > 0 for row in experts] == [False, True]
    # common.LATENCY: L2 prefetches only with PREFETCH, the grid-dependency wait only with PDL, after
    # them and before any global write, the quantizers' early launch of the GEMV only with PDL
    # (sass.latency_builds)
    latency = [line for line in run.stdout.splitlines() if line.startswith("latency build:")]
    assert len(latency) == 12 and not any("WRONG" in line for line in latency)
    assert sum("1 waits" in line for line in latency) == 3 and sum("1 early launches" in line for line in latency) == 2
    assert run.stdout.rstrip().endswith("0 wrong builds")


def _sass_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sass", ROOT / "benchmarks" / "experiments" / "sass.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lane_per_element_reads_plain_and_sliced_layouts():
    # the check behind "whose inline-asm MMAs get one tensor element per lane": a 2-D layout with
    # one element per lane passes, and so does the last-dimension slice of a 3-D one (a pick out of
    # a per-lane vector load); a vector dimension spread over two lanes, or rows over lanes, fails
    def ttgir(layout, operand):
        return (f"#blocked = #ttg.blocked<{{{layout}}}>\n"
                f'  %d:4 = tt.elementwise_inline_asm "mma" %a : tensor<1x128xi32, {operand}> -> x\n')

    plain = "sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [1, 4], order = [1, 0]"
    vec = "sizePerThread = [1, 1, 4], threadsPerWarp = [1, 32, 1], warpsPerCTA = [1, 4, 1], order = [2, 1, 0]"
    split = "sizePerThread = [1, 1, 4], threadsPerWarp = [1, 16, 2], warpsPerCTA = [1, 4, 1], order = [2, 1, 0]"
    rows = "sizePerThread = [1, 1], threadsPerWarp = [2, 16], warpsPerCTA = [1, 4], order = [1, 0]"
    sliced = "#ttg.slice<{dim = 2, parent = #blocked}>"
    check = _sass_module().lane_per_element
    assert check(ttgir(plain, "#blocked"), 4) and check(ttgir(vec, sliced), 4)
    assert not check(ttgir(plain, "#blocked"), 2)  # warps
    assert not check(ttgir(split, sliced), 4) and not check(ttgir(rows, "#blocked"), 4)
    assert not check(ttgir(vec, "#ttg.slice<{dim = 1, parent = #blocked}>"), 4)
