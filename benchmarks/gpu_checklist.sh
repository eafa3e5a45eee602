#!/usr/bin/env bash
# The GPU measurements still owed, in the order of their value per device minute. Run one step
# per device call (each fits in the 10-minute limit); results go to stdout and $OUT when set.
#   bash benchmarks/gpu_checklist.sh tma_ab | fuzz | e2e7b | e2e8b | quant7b | prefill7b | lowering | kernels | group | rows | pipelined
# All recorded in docs/results.md (quant7b: session 4 on the H100; kernels at M >= 4: session 5;
# e2e7b/e2e8b at batch 1 with 256 new tokens, prefill7b, kernels at M = 1-2 with gemlite: session 7;
# pipelined (the TMA GEMV), group, lowering, fuzz (150 of 160 cases), one e2e7b: session 8, all on
# the H200). Owed on the H200: tma_ab (decode with and without TMA in one call: the one session-8
# e2e run did not show the kernel gain), fuzz with the final autotune list, e2e8b and kernels with
# the TMA GEMV, rows (the untimed dp2a rows kernel of session 7 at M = 2, 4, 8), e2e at batch 8,
# the whole 7B quantization (quant7b). The kernels step needs the gemlite wheel carried (.whl is
# git-ignored; benchmarks/README.md says how to build it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
case "${1:-}" in
  fuzz)     python3 benchmarks/fuzz_kernels.py --cases 256 --no-autotune ;;      # issue 7: >= 200 cases
  e2e7b)    python3 benchmarks/bench_e2e.py --shape llama2-7b --batch 1 8 --quant-layers 2 ;;  # issue 5
  e2e8b)    python3 benchmarks/bench_e2e.py --shape llama3-8b --batch 1 8 --skip-quant-timing ;;
  quant7b)  python3 benchmarks/bench_e2e.py --shape llama2-7b --quant-only --quant-layers 32 ;;  # ~5 min expected
  prefill7b) python3 benchmarks/bench_e2e.py --shape llama2-7b --batch 1 --new-tokens 32 --skip-quant-timing --compile-prefill ;;
  lowering) PT2PASS_AUTOTUNE=0 python3 benchmarks/check_gpu_lowering.py check_opcheck check_compile_inlines_kernels check_export_round_trip ;;  # ~1 min (AOTI: add check_aoti, ~4 min; segfaults in the lent torch)
  group)    python3 benchmarks/bench_group.py ;;                                  # ~1 min
  rows)     python3 benchmarks/experiments/sweep_gemv_rows.py ;;                  # ~3 min (session 5: 2.5)
  pipelined) python3 benchmarks/experiments/sweep_gemv_pipelined.py ;;           # ~1.5 min with compiles
  tma_ab)   for t in 0 1; do PT2PASS_TMA=$t python3 benchmarks/bench_e2e.py --shape llama2-7b --batch 1 \
                --new-tokens 128 --skip-quant-timing --skip-bf16; done ;;         # ~3 min each
  kernels)  # needs the gemlite wheel carried in .whl/ (see docs/results.md#kernels)
            python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gemlite-*.whl
            PYTHONPATH=$PYTHONPATH:/tmp/site python3 benchmarks/bench_kernels.py ;;
  *) echo "usage: $0 tma_ab|fuzz|e2e7b|e2e8b|quant7b|prefill7b|lowering|kernels|group|rows|pipelined" >&2; exit 2 ;;
esac
