"""Where does the ternary prefill time go? A profile of one 2048-token forward, bf16 vs ternary.

    python3 benchmarks/experiments/profile_prefill.py --shape llama3-8b --layers 8

Variants (same random bf16 LLaMA-shaped model, ``--layers`` decoder layers):
- ``bf16 HF``: the Hugging Face module, eager (what bench_e2e's bf16 prefill runs);
- ``bf16 captured``: the same model captured by pt2pass (torch.export, no Linear lowered), eager:
  separates the cost of the captured graph from the cost of the ternary Linears;
- ``ternary``: pt2pass.compile(method="rtn"), eager, whole-weight dequantize + cuBLAS;
- ``ternary chunked <MB>``: the same with the weight dequantized in L2-sized chunks
  (``dispatch.DEQUANT_CHUNK_BYTES``);
- with ``--compile``: the bf16 HF module and the ternary model under torch.compile too.
Prints best-of-5 times and, per variant, the CUDA kernels taking the most time.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_e2e import SHAPES, build_model, sync_time  # noqa: E402

import pt2pass  # noqa: E402
from pt2pass.capture import capture  # noqa: E402
from pt2pass.lowering.kernels import dispatch  # noqa: E402


def best_time(fn, ids, repeats=5) -> float:
    for _ in range(2):
        fn(ids)
    return min(sync_time(lambda: fn(ids)) for _ in range(repeats))


def top_kernels(fn, ids, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(ids)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    lines = [f"    GPU total {total / 1e3:.2f} ms in {sum(e.count for e in events)} kernels"]
    for e in events[:rows]:
        lines.append(f"    {e.device_time_total / 1e3:8.2f} ms {e.count:5d}x  {e.key[:110]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk-mb", type=float, nargs="*", default=[8, 16, 32])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rows", type=int, default=10)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    model = build_model(args.shape, args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    gm = capture(model)
    variants = {"bf16 HF": lambda t: model(input_ids=t, use_cache=False).logits,
                "bf16 captured": lambda t: gm(input_ids=t, use_cache=False).logits}
    if args.compile:
        hf_compiled = torch.compile(variants["bf16 HF"], dynamic=False)
        variants["bf16 HF compiled"] = hf_compiled
    qm = pt2pass.compile(model, config=pt2pass.CompileConfig(ternary=pt2pass.TernaryConfig(method="rtn")),
                         progress=False)
    variants["ternary"] = lambda t: qm(t).logits
    results = {}
    for name, fn in variants.items():
        results[name] = best_time(fn, ids)
        print(f"{name:28s} {results[name] * 1e3:8.2f} ms", flush=True)
        print(top_kernels(fn, ids, args.rows), flush=True)
    y_ref = variants["ternary"](ids).float()
    for mb in args.chunk_mb:
        dispatch.DEQUANT_CHUNK_BYTES = int(mb * 2**20)
        name = f"ternary chunked {mb:g} MB"
        fn = variants["ternary"]
        diff = (fn(ids).float() - y_ref).abs().max().item()
        results[name] = best_time(fn, ids)
        print(f"{name:28s} {results[name] * 1e3:8.2f} ms  (max |logit diff| vs unchunked {diff:.3g})",
              flush=True)
        print(top_kernels(fn, ids, args.rows), flush=True)
        dispatch.DEQUANT_CHUNK_BYTES = 0
    if args.compile:
        tern_compiled = torch.compile(variants["ternary"], dynamic=False)
        results["ternary compiled"] = best_time(tern_compiled, ids)
        print(f"{'ternary compiled':28s} {results['ternary compiled'] * 1e3:8.2f} ms", flush=True)
        print(top_kernels(tern_compiled, ids, args.rows), flush=True)
    base = results["bf16 HF"]
    print("\n| variant | ms | bf16 HF / variant |\n|---|---|---|")
    for name, t in results.items():
        print(f"| {name} | {t * 1e3:.2f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
