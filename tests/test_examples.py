"""The examples run as written (the fast ones; quantize_and_generate loads SmolLM2: slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, *args: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_compose_passes():
    out = _run("compose_passes.py")
    assert "LowerTernaryLinear   modified=True" in out
    assert "gathers folded: 1" in out
    assert out.count("pt2pass.ternary_linear.default") == 2


def test_export_and_reload():
    out = _run("export_and_reload.py")
    assert "14 pt2pass.ternary_linear nodes" in out
    lines = [line for line in out.splitlines() if line.startswith("tensor(")]
    assert len(lines) == 2 and lines[0] == lines[1].replace(" (in this process)", "")


@pytest.mark.slow
def test_quantize_and_generate():
    # the example's code path with less calibration (its default, 16 x 512, takes ~2 minutes more)
    out = _run("quantize_and_generate.py", "--n-samples", "4", "--seqlen", "128")
    assert "KING HENRY" in out and "largest output error" in out


def test_export_decode_and_generate():
    out = _run("export_decode_and_generate.py")
    tokens = [line.split(":", 1)[1].strip() for line in out.splitlines()
              if line.startswith(("static cache:", "no cache:", "fresh process:"))]
    assert len(tokens) == 3 and len(set(tokens)) == 1 and tokens[0].count(",") == 15


def test_bench_e2e_runs_on_a_tiny_shape():
    """The GPU end-to-end benchmark's code path (decode graphs, rtn compile, quantizer timing) on
    CPU with a tiny model, so the script does not rot between GPU sessions."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"
    done = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--prompt", "8",
                           "--new-tokens", "4", "--prefill", "32", "--batch", "1",
                           "--quant-layers", "1", "--calib", "2x32", "--calib-batch", "2"],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| decode tok/s, batch 1 |" in done.stdout
    assert "2.250 bits/weight in graph" in done.stdout
    # --quant-only over every layer: the whole-model quantization time, labelled measured
    done = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--quant-only",
                           "--quant-layers", "2", "--calib", "2x32", "--calib-batch", "2"],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| PT² quantization, 2 layers, 2x32 calib |" in done.stdout
    assert "(measured)" in done.stdout and "decode" not in done.stdout


def _script(relative: str):
    """A benchmark script as a module (they are not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _profile_decode():
    return _script("experiments/profile_decode.py")


def test_ablation_merges_per_seed_runs_into_median_and_spread(tmp_path):
    """ablation.py --merge-json of runs with several calibration seeds: one row per configuration,
    a column per seed, median and max / min, written between its own markers (the one-seed table,
    which pt2pass.plots reads, stays)."""
    module = _script("ablation.py")

    def row(key, seed, ppl):
        return dict(key=key, name=module.CONFIGS[key][0] if key != "fp" else "full precision (fp32)",
                    ppl=ppl, bits=2.3, bits_trit=1.9, tokens=254, windows=2, seed=seed,
                    quant_s=0.0 if seed is None else 10.0 * (seed + 1))

    runs = [[row("fp", None, 30.0), row("full", 0, 500.0), row("full", 1, 650.0)],
            [row("full", 2, 520.0), row("act_order", 0, 400.0), row("act_order", 1, 440.0)]]
    paths = []
    for i, rows in enumerate(runs):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(rows))
    results = tmp_path / "results.md"
    results.write_text("# Results\n\n<!-- ablation:start -->\nold one-seed table\n<!-- ablation:end -->\n")
    argv = ["ablation.py", "--merge-json", *map(str, paths), "--results", str(results)]
    with mock.patch.object(sys, "argv", argv):  # --seeds not given: taken from the rows
        module.main()
    text = results.read_text()
    assert "old one-seed table" in text
    table = text.split("<!-- ablation-seeds:start -->")[1].split("<!-- ablation-seeds:end -->")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0] == ("| configuration | seed 0 | seed 1 | seed 2 | median | max / min | "
                        "quantize time (s), median |")
    assert lines[1] == "| full precision (fp32) | 30.0 | 30.0 | 30.0 | 30.0 | 1.00 | 0 |"
    assert lines[2].startswith("| ITF + AGA, GPTQ compensation, act-order | 400.0 | 440.0 |  | 420.0 | "
                               "1.10 | 15 |")
    assert lines[3].startswith("| PT²-LLM: ITF + AGA + GPTQ compensation + SSR | 500.0 | 650.0 | 520.0 | "
                               "520.0 | 1.30 | 20 |")
    assert "--seeds 0 1 2`" in table


def test_profile_decode_families_count_inductor_prologues_as_fused_ops():
    """profile_decode.py sorts kernels into families by name; Inductor names a fused kernel after
    the ops it feeds, so SDPA's RoPE prologue must not count as attention (session 11's A/B did)."""
    module = _profile_decode()
    fused, attention = "Inductor fused ops", "attention"
    assert module.family("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_arange") == fused
    assert module.family("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_view_13") == fused
    assert module.family("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16") == attention
    assert module.family("_decode_attention_split_kernel") == attention
    assert module.family("_decode_attention_combine_kernel") == attention
    assert module.family("ternary_gemv_group_kernel") == "ternary GEMV, grouped (q/k/v, gate/up)"
    assert module.family("_quantize_x_kernel") == "x quantize (dp2a)"


def test_profile_decode_logs_inductor_autotuning_and_its_warnings_only(capsys):
    import logging

    module = _profile_decode()
    logger = logging.getLogger(module.AUTOTUNE_LOGGER)
    before = (list(logger.handlers), logger.level, logger.propagate)
    try:
        module.log_autotuning()
        logger.debug(module.AUTOTUNE_MESSAGES[0], "ternary_gemv_dp2a_kernel")
        logger.debug(module.AUTOTUNE_MESSAGES[1], "BN: 8, NBT: 16", 0.0123, 96, 0, 0)
        logger.debug("Triton cache miss for %s", "x")
        logger.warning("config %s failed", 3)
    finally:
        logger.handlers[:], logger.level, logger.propagate = before
    assert capsys.readouterr().out.splitlines() == [
        "    inductor DEBUG: Benchmark all input configs for ternary_gemv_dp2a_kernel, get:",
        "    inductor DEBUG: BN: 8, NBT: 16: 0.012300, nreg 96, nspill 0, #shared-mem 0",
        "    inductor WARNING: config 3 failed"]


def test_sensitivity_perturbation_and_codes_in_original_order():
    """sensitivity.py: H moves by exactly one float32 ulp (relative), symmetrically; codes are
    compared in the original column order (T is stored in quantization order)."""
    module = _script("experiments/sensitivity.py")
    H = torch.rand(6, 6, dtype=torch.float64) + 1
    H = H + H.T
    P = module.perturbed(H, seed=0)
    assert torch.equal(P, P.T)
    rel = (P - H) / H  # +-2^-23 up to float64 rounding of the difference
    torch.testing.assert_close(rel.abs(), torch.full_like(H, 2.0 ** -23), rtol=1e-6, atol=0)
    assert (rel > 0).any() and (rel < 0).any()

    class Result:  # the fields QuantResult and LayerQuant share
        T = torch.tensor([[10, 11, 12, 13]])
        perm = torch.tensor([2, 0, 3, 1])  # column perm[i] was quantized i-th

    assert module.codes(Result()).tolist() == [[11, 13, 10, 12]]
    Result.perm = None
    assert module.codes(Result()).tolist() == [[10, 11, 12, 13]]


def test_ncu_summary_reads_units_and_matches_kernels_to_cases(tmp_path, capsys):
    """ncu_kernels.py summary: ncu's raw CSV (a metric-name row, a unit row, one row per kernel)
    is read with its units, and the kernels after the k-th marker launch belong to case k."""
    module = _script("experiments/ncu_kernels.py")
    head = ["ID", "Kernel Name", "Block Size", "Grid Size", "gpu__time_duration.sum", "dram__bytes_read.sum",
            "dram__bytes_write.sum", "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
            "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio"]
    units = ["", "", "", "", "usecond", "Mbyte", "Kbyte", "inst", "inst"]
    rows = [["0", "at::<unnamed>::spin_kernel(long)", "(1, 1, 1)", "(1, 1, 1)", "2.1", "0", "0", "4", "0"],
            ["1", "ternary_gemv_dp2a_kernel", "(64, 1, 1)", "(1792, 1, 1)", "25", "50", "1,000", "0.5", "1.5"],
            ["2", "at::<unnamed>::spin_kernel(long)", "(1, 1, 1)", "(1, 1, 1)", "2.1", "0", "0", "4", "0"],
            ["3", "nvjet_gemv", "(384, 1, 1)", "(2, 66, 1)", "100", "400", "0", "1", "20"]]
    path = tmp_path / "raw.csv"
    path.write_text("\n".join(",".join(f'"{v}"' for v in row) for row in [head, units, *rows]) + "\n")
    module.summary(str(path), [module.parse_case("28672x8192:1"), module.parse_case("4096x4096:16")])
    lines = [line for line in capsys.readouterr().out.splitlines() if "M=" in line]
    assert len(lines) == 2  # the markers are not rows
    assert lines[0].startswith("28672x8192 M=1") and "ternary_gemv_dp2a_kernel" in lines[0]
    assert lines[1].startswith("4096x4096 M=16") and "nvjet_gemv" in lines[1]
    # 51 MB (50 Mbyte read + 1,000 Kbyte written) in 25 us = 2040 GB/s; stalls largest first
    assert " 2040 " in lines[0] and lines[0].endswith("long_scoreboard 1.5 wait 0.5")
    assert " 4000 " in lines[1]
