"""pt2pass::ternary_experts against bf16 ``torch._grouped_mm`` on MoE expert shapes (run on the GPU).

Correctness first (the grouped Triton GEMM against the per-expert loop, every case, fresh random
routing), then the median time per call inside a CUDA graph that cycles through weight copies
(cold L2, as in bench_kernels.py). Rows are tokens x top-k, sorted by expert as transformers
sorts them; each token picks top-k distinct experts at random, so decode touches only a few experts
(both kernels read only those: the bf16 grouped GEMM skips empty groups, the ternary one lists no
tile for them).

    python3 benchmarks/bench_experts.py                     # Mixtral-8x7B and Qwen3-30B-A3B experts
    python3 benchmarks/bench_experts.py --models mixtral --tokens 1 8
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pt2pass  # noqa: E402,F401
from pt2pass.bench import ROTATE_BYTES, checked_gpu_run, random_ternary_layer, rel_err, time_graph  # noqa: E402

# name: (experts, top-k, [(projection, N, K)]) of the expert weights (E, N, K)
MODELS = {"mixtral": (8, 2, [("gate_up", 28672, 4096), ("down", 4096, 14336)]),
          "qwen3-30b-a3b": (128, 8, [("gate_up", 1536, 2048), ("down", 2048, 768)])}


def stacked_experts(e: int, n: int, k: int):
    """Random ternary experts: packed (E, N, K / 16), bf16 alpha and mu (E, N, K / 128)."""
    parts = [random_ternary_layer(n, k, "cuda")[1:] for _ in range(e)]
    return tuple(torch.stack(t) for t in zip(*parts))


def routing(tokens: int, e: int, top_k: int, seed: int) -> torch.Tensor:
    """offs (E,) int32 of tokens x top_k rows: each token's top_k distinct experts at random."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(tokens, e, generator=g).argsort(dim=1)[:, :top_k]
    return torch.bincount(picks.flatten(), minlength=e).cumsum(0).to("cuda", torch.int32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 2048],
                        help="tokens per call (rows = tokens x top-k)")
    args = parser.parse_args()
    op, loop = torch.ops.pt2pass.ternary_experts, torch.ops.pt2pass.ternary_experts_loop
    cases = [(model, proj, e, top_k, n, k, tokens) for model in args.models
             for e, top_k, projections in [MODELS[model]] for proj, n, k in projections for tokens in args.tokens]

    def check(_device) -> bool:
        ok = True
        for model, proj, e, top_k, n, k, tokens in cases:
            packed, alpha, mu = stacked_experts(e, n, k)
            perm = torch.stack([torch.randperm(k, device="cuda") for _ in range(e)]).int()
            offs = routing(tokens, e, top_k, seed=tokens)
            x = torch.randn(tokens * top_k, k, device="cuda", dtype=torch.bfloat16)
            err = rel_err(op(x, offs, packed, alpha, mu, perm, 128), loop(x, offs, packed, alpha, mu, perm, 128))
            print(f"check {model} {proj} {e}x{n}x{k} rows={tokens * top_k}: rel err {err:.2e}", flush=True)
            ok &= err < 1e-2
        return ok

    checked_gpu_run(check)
    print("| model | experts | E x N x K | tokens (rows) | bf16 grouped_mm us | ternary us | speed-up |")
    print("|---|---|---|---|---:|---:|---:|")
    for model, proj, e, top_k, n, k, tokens in cases:
        offs = routing(tokens, e, top_k, seed=tokens)
        x = torch.randn(tokens * top_k, k, device="cuda", dtype=torch.bfloat16)
        copies = max(2, int(ROTATE_BYTES // (e * n * k * 2)) + 1)
        dense = [torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        t_dense = time_graph([lambda w=w: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs) for w in dense], 20)
        del dense
        tern = [stacked_experts(e, n, k) for _ in range(max(2, copies))]
        t_tern = time_graph([lambda p=p: op(x, offs, *p, None, 128) for p in tern], 20)
        del tern
        print(f"| {model} | {proj} | {e}x{n}x{k} | {tokens} ({tokens * top_k}) | {t_dense * 1e6:.1f} | "
              f"{t_tern * 1e6:.1f} | {t_dense / t_tern:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
