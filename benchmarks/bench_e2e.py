"""End-to-end speed and memory of a ternarized LLaMA-shaped model against bf16, on a GPU.

    python3 benchmarks/bench_e2e.py --shape llama2-7b            # on the device machine
    python3 benchmarks/bench_e2e.py --shape llama3-8b --skip-quant-timing
    python3 benchmarks/bench_e2e.py --quant-only --quant-layers 32   # the whole 7B quantization

Weights are random bf16 (speed does not depend on their values; no hub is needed). Both models
run through the same machinery: the decode step is pt2pass's static-KV-cache graph
(``decode.build_decode_graph``; for bf16 with an empty store, i.e. no Linear lowered) compiled with
``torch.compile(mode="reduce-overhead")`` (CUDA graphs); prefill is the full-sequence forward,
run eagerly for both (the matmuls dominate; ``--compile-prefill`` compiles it). The ternary
model's codes come from ``method="rtn"`` (no calibration needed; the kernels do not care how T
was found). Quantization time of the real
PT²-LLM quantizer is measured separately (``--quant-layers`` decoder layers of the same shape with
``--calib`` random-token calibration; the full-model time is extrapolated linearly and labelled so).
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pt2pass
from pt2pass.decode import CachedDecoder, build_decode_graph, decode_attention_default, make_skeleton
from pt2pass.lowering.ops import compile_fresh
from pt2pass.sizes import bits_per_weight, ternary_linear_sizes
from pt2pass.store import QuantStore

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
    # a smoke test of this script on any machine (CPU too): python benchmarks/bench_e2e.py --shape tiny
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_model(shape: str, layers=None) -> LlamaForCausalLM:
    settings = dict(SHAPES[shape])
    if layers:
        settings["num_hidden_layers"] = layers
    config = LlamaConfig(**settings, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def sync_time(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def reset_peak() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def decode_rate(decoder: CachedDecoder, batch: int, prompt: int, new_tokens: int, vocab: int) -> tuple:
    """Decode tokens/s per sequence, (new_tokens - 1) / (t(generate new_tokens) - t(generate 1)),
    and the seconds of the first generate (compile, autotuning, CUDA-graph capture)."""
    ids = torch.randint(0, vocab, (batch, prompt), device=DEVICE)
    warm_s = sync_time(lambda: decoder.generate(ids, min(8, new_tokens)))
    t_one = min(sync_time(lambda: decoder.generate(ids, 1)) for _ in range(3))
    t_all = min(sync_time(lambda: decoder.generate(ids, new_tokens)) for _ in range(2))
    return (new_tokens - 1) / (t_all - t_one), warm_s


def prefill_seconds(forward, tokens: int, vocab: int, compile_prefill: bool) -> float:
    """Best of 5 full-sequence forwards of ``tokens`` tokens (logits of every position), eager
    (the matmuls dominate at this size) or compiled with ``torch.compile``."""
    compiled = compile_fresh(forward, dynamic=False) if compile_prefill else forward
    ids = torch.randint(0, vocab, (1, tokens), device=DEVICE)
    with torch.no_grad():
        for _ in range(2):
            compiled(ids)
        return min(sync_time(lambda: compiled(ids)) for _ in range(5))


def speed(forward, skeleton, store, args, vocab, group_siblings=True) -> dict:
    """Decode tokens/s and peak memory per batch size, then prefill seconds (``forward`` None:
    decode only). ``group_siblings``: q/k/v and gate/up as one grouped op each (the default)."""
    row = {}
    for batch in args.batch:
        start = time.perf_counter()
        graph = build_decode_graph(skeleton, store, batch, args.prompt + args.new_tokens,
                                   group_siblings=group_siblings)
        row[f"graph_build_s_b{batch}"] = time.perf_counter() - start
        decoder = CachedDecoder(graph, compile_decode=DEVICE == "cuda")
        reset_peak()
        rate, row[f"first_generate_s_b{batch}"] = decode_rate(decoder, batch, args.prompt, args.new_tokens, vocab)
        row[f"decode_tok_s_b{batch}"] = rate
        row[f"peak_gib_b{batch}"] = peak_gib()
        print(f"  batch {batch}: decode graph built in {row[f'graph_build_s_b{batch}']:.0f} s, first generate "
              f"(compile, autotuning, capture) {row[f'first_generate_s_b{batch}']:.0f} s, {rate:.1f} tok/s",
              flush=True)
        del decoder, graph
        torch._dynamo.reset()
        reset_peak()
    if forward is not None and not args.skip_prefill:
        row["prefill_s"] = prefill_seconds(forward, args.prefill, vocab, args.compile_prefill)
        torch._dynamo.reset()
    return row


def quant_timing(args) -> dict:
    """The PT² quantizer (calibration capture, SSR, ITF, AGA, exact compensation) on
    ``--quant-layers`` decoder layers with ``--calib`` (n x seqlen) random-token calibration."""
    n, seqlen = map(int, args.calib.split("x"))
    model = build_model(args.shape, args.quant_layers)
    calib = torch.randint(0, model.config.vocab_size, (n, seqlen), device=DEVICE)
    reset_peak()
    config = pt2pass.CompileConfig(seqlen=seqlen, batch_size=args.calib_batch)
    seconds = sync_time(lambda: pt2pass.compile(model, calib, config=config, progress=False))
    peak = peak_gib()
    total_layers = SHAPES[args.shape]["num_hidden_layers"]
    return {"quant_layers": args.quant_layers, "calib": args.calib, "quant_s": seconds,
            "quant_peak_gib": peak, "quant_s_full": seconds * total_layers / args.quant_layers,
            "extrapolated": args.quant_layers != total_layers}


def ternary_speed(qm, args, vocab: int, results: dict) -> None:
    """:func:`speed` of the ternarized model, with its sizes, into results["ternary"] (and
    results["ternary_ungrouped"] with ``--ungrouped-too``)."""
    sizes = ternary_linear_sizes(qm.gm)
    results["ternary"] = speed(lambda ids: qm(ids).logits, qm.skeleton, qm.store, args, vocab)
    results["ternary"].update(linear_bytes=sizes.packed_bytes, bits_per_weight_in_graph=sizes.bits_per_weight,
                              bits_per_weight_2bit=bits_per_weight(qm.store, "2bit"))
    print("ternary", results["ternary"], flush=True)
    if args.ungrouped_too:
        results["ternary_ungrouped"] = speed(None, qm.skeleton, qm.store, args, vocab, group_siblings=False)
        print("ternary, q/k/v and gate/up ungrouped", results["ternary_ungrouped"], flush=True)
        for batch in args.batch:
            k = f"decode_tok_s_b{batch}"
            grouped, ungrouped = results["ternary"][k], results["ternary_ungrouped"][k]
            print(f"decode batch {batch}: grouped {grouped:.1f} tok/s, ungrouped {ungrouped:.1f} "
                  f"({grouped / ungrouped:.2f}x)", flush=True)


def print_quant_row(q: dict) -> None:
    full = (f"full model ~{q['quant_s_full'] / 60:.1f} min (extrapolated)" if q["extrapolated"]
            else f"full model {q['quant_s_full'] / 60:.1f} min (measured)")
    print(f"| PT² quantization, {q['quant_layers']} layers, {q['calib']} calib | | {q['quant_s']:.1f} s "
          f"(peak {q['quant_peak_gib']:.1f} GiB) | {full} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--skip-prefill", action="store_true",
                        help="no prefill timing (it does not depend on --batch; saves its GEMM autotuning)")
    parser.add_argument("--compile-prefill", action="store_true",
                        help="torch.compile the prefill forward too (default: eager for both)")
    parser.add_argument("--quant-layers", type=int, default=4)
    parser.add_argument("--calib", default="128x2048", help="calibration windows x tokens")
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--skip-quant-timing", action="store_true")
    parser.add_argument("--quant-only", action="store_true",
                        help="only the quantizer timing (e.g. --quant-layers 32: the whole model)")
    parser.add_argument("--skip-bf16", action="store_true",
                        help="ternary only (e.g. when the bf16 figures of this GPU are known)")
    parser.add_argument("--skip-ternary", action="store_true",
                        help="bf16 only (a batch-8 run of both does not fit one 10-minute device call)")
    parser.add_argument("--ungrouped-too", action="store_true",
                        help="also time decode with q/k/v and gate/up as separate ops")
    parser.add_argument("--json", help="also write the results as JSON")
    args = parser.parse_args()
    if args.skip_bf16 and args.skip_ternary:
        parser.error("--skip-bf16 and --skip-ternary leave nothing to measure")
    if args.skip_prefill and args.compile_prefill:
        parser.error("--compile-prefill asks for the prefill timing that --skip-prefill skips")
    torch.set_grad_enabled(False)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke test: reference op path)"
    print(name, "torch", torch.__version__, flush=True)
    # the decode graphs of both models take the decode attention kernel (unless PT2PASS_DECODE_ATTENTION=0)
    results = {"shape": args.shape, "args": vars(args), "decode_attention": decode_attention_default()}
    if args.quant_only:
        results["quant"] = quant_timing(args)
        print("quant", results["quant"], flush=True)
        print_quant_row(results["quant"])
        write_json(args.json, results)
        return
    print("decode attention:", "pt2pass.attention" if results["decode_attention"] else "SDPA", flush=True)

    model = build_model(args.shape)
    vocab = model.config.vocab_size
    if not args.skip_bf16:
        empty = QuantStore()
        results["bf16"] = speed(lambda ids: model(input_ids=ids, use_cache=False).logits,
                                make_skeleton(model, empty), empty, args, vocab)
        results["bf16"]["linear_bytes"] = sum(m.weight.numel() * 2 for m in model.modules()
                                              if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
        print("bf16", results["bf16"], flush=True)

    if not args.skip_ternary:
        start = time.perf_counter()
        qm = pt2pass.compile(model, config=pt2pass.CompileConfig(
            ternary=pt2pass.TernaryConfig(method="rtn")), progress=False)
        results["rtn_compile_s"] = time.perf_counter() - start
        print(f"ternary (rtn) compile: {results['rtn_compile_s']:.0f} s", flush=True)
        del model  # the bf16 Linear weights: the ternary peaks must not count them
        reset_peak()
        ternary_speed(qm, args, vocab, results)
        del qm
    else:
        del model
    reset_peak()
    if not args.skip_quant_timing:
        results["quant"] = quant_timing(args)
        print("quant", results["quant"], flush=True)

    if "bf16" in results and "ternary" in results:
        print_table(args, results)
    if "quant" in results:
        print_quant_row(results["quant"])
    write_json(args.json, results)


def print_table(args, results: dict) -> None:
    b, t = results["bf16"], results["ternary"]
    print(f"\n| {args.shape} | bf16 | ternary | ratio |\n|---|---|---|---|")
    for batch in args.batch:
        k = f"decode_tok_s_b{batch}"
        print(f"| decode tok/s, batch {batch} | {b[k]:.1f} | {t[k]:.1f} | {t[k] / b[k]:.2f}x |")
        k = f"peak_gib_b{batch}"
        print(f"| peak GPU memory (GiB), batch {batch} | {b[k]:.1f} | {t[k]:.1f} | {b[k] / t[k]:.2f}x less |")
    if "prefill_s" in b:
        print(f"| prefill {args.prefill} tokens (ms) | {b['prefill_s'] * 1e3:.1f} | {t['prefill_s'] * 1e3:.1f} | "
              f"{b['prefill_s'] / t['prefill_s']:.2f}x speed |")
    print(f"| Linear weights (MB) | {b['linear_bytes'] / 1e6:.0f} | {t['linear_bytes'] / 1e6:.0f} | "
          f"{t['bits_per_weight_in_graph']:.3f} bits/weight in graph, {t['bits_per_weight_2bit']:.3f} all-in |")


def write_json(path, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
