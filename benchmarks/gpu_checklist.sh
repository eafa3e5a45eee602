#!/usr/bin/env bash
# The GPU measurements still owed, in the order of their value per device minute. Run one step
# per device call (each fits in the 10-minute limit); results go to stdout and $OUT when set.
#   bash benchmarks/gpu_checklist.sh experts | latency | fusenorm | pdl | attention | attn_ab | imma | imma7 | imma18 | imma_cg | kernels16 | lowering | fuzz | e2e7b | e2e8b | e2e7b8
#                                    | e2e7b8bf16 | kernels | swap | profile | quant7b | prefill7b | group
#                                    | rows | pipelined | tma_ab | ncu [--cases NxK:M ...]
# All recorded in docs/results.md (quant7b: session 4 on the H100; kernels at M >= 64: session 5;
# e2e7b/e2e8b at batch 1 with 256 new tokens, prefill7b, kernels at M = 1-2 with gemlite: session 7;
# pipelined, group: session 8; the imma sweep on 4 of the 7 shapes: session 9; lowering incl. the
# export round trip, profile + tma_ab with fresh traces, bf16 at batch 8: session 10, all on the
# H200; attention, attn_ab at 8 layers, ternary e2e7b at batch 8 with SDPA: session 11; e2e7b,
# e2e8b with the decode attention on, attention again, profile of the 7B step, fuzz to 200 of 256
# cases: session 13; on the H100: kernels (all 42 rows with gemlite), the swapped-GEMM sweep (swap),
# fuzz 256/256: session 14; lowering incl. the padded-batch check, kernels without gemlite at
# M = 256 (0.58x) and 1-2048: session 15, H100; e2e7b with compiled prefill, padded: session 16,
# H100; fusenorm (correct, 3 % slower: stays opt-in), pdl (no gain for ternary), kernels with
# gemlite (42 rows over two calls), e2e8b decode at batch 1 (prefill cut by the timeout): session
# 17, H100; ncu (every path's counters, fixed configs) and three integer-MMA variants, all slower: session
# 18, H200; imma18 (opcheck + compile PASS, block-major statistics -10 % at M = 4-16 on 28672x8192) and
# the vector scales: session 19, H100; imma7 before and after the vector x loads: session 20, H100;
# latency (fixed configs) and ncu of the integer-MMA GEMV at M = 4 / 16: session 21, H100).
# Owed: FIRST `python3 benchmarks/check_gpu_lowering.py check_opcheck check_compile_inlines_kernels check_experts`
# (check_experts: session 22's MoE experts GEMM, never run on a GPU),
# autotuning on (session 21 turned the dependent launch on by default
# and gave the integer-MMA GEMV's autotuner prefetch configs, neither through torch.compile on a
# GPU yet), then `PT2PASS_AUTOTUNE=1 python3 benchmarks/experiments/sweep_latency.py --settings 0
# 0,pdl` (the dependent launch with autotuned configs; session 21 had fixed ones) and
# `bench_kernels.py --no-gemlite --ms 1 4 16` (the issue table at the current code), the K-split
# sweep the profile asks for (`sweep_gemv_imma.py --no-check --ms 4 16 --shapes 28672x8192 --configs
# 1,4,4 1,4,2 --splits 1 2 4 6`: 448 programs fill 21 % of the warp slots), imma_cg, kernels16,
# e2e7b8 / e2e7b8bf16 (batch 8 with the decode attention), e2e8b's prefill and
# ternary peak memory, profile on the 8B shape (profile_decode.py --shape llama3-8b ...
# --log-autotune: session 11's 8B dp2a GEMV took 140.9 vs 92.4 us between two traces),
# quant7b on the H200. The kernels step needs the gemlite wheel carried (.whl is git-ignored;
# benchmarks/README.md says how to build it) and outlasts one call (split it with --shapes). Each
# profile_decode setting needs ~100-290 s (model build, rtn codes,
# compile with autotuning): one or two per call. A fresh machine took ~3-5 minutes to start.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
case "${1:-}" in
  experts)  python3 benchmarks/check_gpu_lowering.py check_opcheck check_compile_inlines_kernels check_experts  # ~2 min
            python3 benchmarks/bench_experts.py ;;  # MoE experts vs bf16 grouped_mm, never run yet
  fuzz)     python3 benchmarks/fuzz_kernels.py --cases 256 --no-autotune ;;      # issue 7: >= 200 cases
  # issue 5; one batch size per call: ternary alone at batch 8 took 8 min 43 s (session 11)
  e2e7b)    python3 benchmarks/bench_e2e.py --shape llama2-7b --batch 1 --skip-quant-timing ;;
  e2e8b)    python3 benchmarks/bench_e2e.py --shape llama3-8b --batch 1 --skip-quant-timing ;;
  e2e7b8)   python3 benchmarks/bench_e2e.py --shape llama2-7b --batch 8 --skip-quant-timing --skip-prefill --skip-bf16 ;;
  e2e7b8bf16) python3 benchmarks/bench_e2e.py --shape llama2-7b --batch 8 --skip-quant-timing --skip-prefill --skip-ternary ;;
  quant7b)  python3 benchmarks/bench_e2e.py --shape llama2-7b --quant-only --quant-layers 32 ;;  # ~5 min expected
  prefill7b) python3 benchmarks/bench_e2e.py --shape llama2-7b --batch 1 --new-tokens 32 --skip-quant-timing --compile-prefill ;;
  fusenorm) PT2PASS_AUTOTUNE=0 python3 benchmarks/check_gpu_lowering.py check_fused_norm    # ~1-2 min
            python3 benchmarks/experiments/profile_decode.py --shape llama2-7b --layers 8 \
              --env PT2PASS_FUSE_NORM=0 PT2PASS_FUSE_NORM=1 ;;                          # ~3-4 min
  pdl)      python3 benchmarks/experiments/profile_decode.py --shape llama2-7b --layers 8 --bf16 \
              --env inductor.triton.enable_pdl=0 inductor.triton.enable_pdl=1 ;;        # ~5 min
  lowering) PT2PASS_AUTOTUNE=0 python3 benchmarks/check_gpu_lowering.py check_opcheck check_compile_inlines_kernels check_export_round_trip check_padded_generate check_fused_norm check_experts ;;  # ~2 min (AOTI: add check_aoti, ~4 min; segfaults in the lent torch)
  group)    python3 benchmarks/bench_group.py ;;                                  # ~1 min
  rows)     python3 benchmarks/experiments/sweep_gemv_rows.py ;;                  # ~3 min (session 5: 2.5)
  pipelined) python3 benchmarks/experiments/sweep_gemv_pipelined.py ;;           # ~1.5 min with compiles
  tma_ab)   python3 benchmarks/experiments/profile_decode.py --shape llama2-7b --tma 0 1 0 1 ;;  # ~5 min
  profile)  python3 benchmarks/experiments/profile_decode.py --shape llama2-7b --bf16 --tma 1 --rows 40 --log-autotune ;;  # ~4 min
  attention) PT2PASS_AUTOTUNE=0 python3 benchmarks/check_gpu_lowering.py check_attention check_decode_graph_attention
            python3 benchmarks/experiments/bench_decode_attention.py ;;        # ~1 min (session 11)
  attn_ab)  python3 benchmarks/experiments/profile_decode.py --shape llama2-7b \
              --env PT2PASS_DECODE_ATTENTION=0 PT2PASS_DECODE_ATTENTION=1 ;;  # ~5 min
  imma)     python3 benchmarks/experiments/sweep_gemv_imma.py --tuned-only --ms 2 4 8 16 ;;     # compiles ~4 min
  imma7)    # every config of the autotune list, fixed, on the largest shape: which to keep, which is the default; ~2 min
            PT2PASS_AUTOTUNE=0 python3 benchmarks/experiments/sweep_gemv_imma.py --ms 4 16 --shapes 28672x8192 \
              --configs 1,4,4 1,2,2 1,4,2 1,8,2 1,8,4 1,2,4 1,4,8 ;;
  kernels16) python3 benchmarks/bench_kernels.py --no-gemlite --ms 16 ;;                 # ~5.5 min (autotuning)
  latency)  # common.LATENCY (L2 prefetch of each program's weight range, dependent launch behind the x
            # quantizer) on and off: bit-equality checks, then 7 shapes x M = 1, 4, 16 and the 7B groups; ~5 min
            PT2PASS_AUTOTUNE=0 python3 benchmarks/experiments/sweep_latency.py ;;
  imma_cg)  # the integer-MMA GEMV with its streamed words and scales loaded past L1 (",cg"), so that L1
            # keeps the x fragments, against the same configs without; ~3 min
            PT2PASS_AUTOTUNE=0 python3 benchmarks/experiments/sweep_gemv_imma.py --ms 4 16 --top 8 \
              --shapes 28672x8192 4096x11008 --configs 1,4,4 1,4,4,cg 1,4,2 1,4,2,cg 1,8,4 1,8,4,cg 1,4,8 1,4,8,cg ;;
  imma18)   # session 18's block-major x statistics, never run on a GPU: correctness through Inductor, then
            # the sweep (its own float64 check first) against session 18's H200 numbers at 3e723d9:
            # 28672x8192 (1, 4, 4) 60.9 / 100.3 us, (1, 4, 2) 83.3 / 91.4 us at M = 4 / 16; ~4 min
            PT2PASS_AUTOTUNE=0 python3 benchmarks/check_gpu_lowering.py check_opcheck check_compile_inlines_kernels
            PT2PASS_AUTOTUNE=0 python3 benchmarks/experiments/sweep_gemv_imma.py --ms 4 16 \
              --shapes 28672x8192 11008x4096 --configs 1,4,4 1,4,2 ;;
  kernels)  # needs the gemlite wheel carried in .whl/ (see docs/results.md#kernels); ~6.5 min
            python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gemlite-*.whl
            PYTHONPATH=$PYTHONPATH:/tmp/site python3 benchmarks/bench_kernels.py ;;
  swap)     python3 benchmarks/experiments/sweep_gemm_swap.py --budget 370 ;;    # ~8.5 min
  ncu)      # Nsight Compute counters of the kernels and of cuBLAS (issue 4's "profile that shows it")
            NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | tail -1)
            R=${OUT:-/tmp}/kernels
            "$NCU" --nvtx --nvtx-include "prof/" --clock-control none --target-processes all -f -o "$R" \
              --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
              --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
              --section InstructionStats --metrics dram__bytes_read.sum,dram__bytes_write.sum \
              python3 benchmarks/experiments/ncu_kernels.py run "${@:2}"
            "$NCU" --import "$R.ncu-rep" --csv --page raw > "$R.raw.csv"
            "$NCU" --import "$R.ncu-rep" --csv --page details > "$R.details.csv"
            python3 benchmarks/experiments/ncu_kernels.py summary "$R.raw.csv" "${@:2}" ;;
  *) echo "usage: $0 latency|fusenorm|pdl|attention|attn_ab|imma|imma7|imma18|kernels16|lowering|fuzz|e2e7b|e2e8b|e2e7b8|e2e7b8bf16|kernels|swap|ncu|profile|quant7b|prefill7b|group|rows|pipelined|tma_ab" >&2; exit 2 ;;
esac
