"""Grouped ternary Linears at batch 1 (q/k/v, gate/up of LLaMA shapes): one launch for the group
(``pt2pass::ternary_linear_group``, kernels/gemv_group.py) against one ``ternary_linear`` call per
member, and against bf16 ``F.linear`` per member, on a GPU.

    python3 benchmarks/bench_group.py            # on the device machine

Correctness first (each member of the grouped op against a float64 product, with bias and SSR
permutations), then the median of CUDA-graph replays cycling through >= 200 MB of weight copies
(bench.time_graph, as bench_kernels.py), bf16 activations, random codes, bf16 scales, each member
with its own SSR permutation (what PT²-LLM produces) and, for the rtn case, without.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pt2pass  # noqa: E402,F401  (registers torch.ops.pt2pass)
from pt2pass.bench import checked_gpu_run, random_ternary_layer, rel_err, rotating_copies, time_graph  # noqa: E402
from pt2pass.lowering.reference import ternary_linear_reference  # noqa: E402

OP = torch.ops.pt2pass.ternary_linear
GROUP = torch.ops.pt2pass.ternary_linear_group
GROUPS = {  # name: member output sizes, K
    "llama2-7b q/k/v": ([4096, 4096, 4096], 4096),
    "llama2-7b gate/up": ([11008, 11008], 4096),
    "llama3-8b q/k/v": ([4096, 1024, 1024], 4096),
    "llama3-8b gate/up": ([14336, 14336], 4096),
}


def members(sizes, k, dev, bias=False, perm=True):
    out = []
    for n in sizes:
        _, packed, alpha, mu = random_ternary_layer(n, k, dev)
        b = torch.randn(n, device=dev).to(torch.bfloat16) if bias else None
        p = torch.randperm(k, device=dev) if perm else None
        out.append((packed, alpha, mu, b, p))
    return out


def check(dev) -> bool:
    ok = True
    for name, (sizes, k) in GROUPS.items():
        for bias, perm in ((True, True), (False, False)):
            torch.manual_seed(len(name))
            group = members(sizes, k, dev, bias, perm)
            x = (torch.randn(1, k, device=dev) * torch.logspace(-2, 2, k, device=dev)).to(torch.bfloat16)
            outs = GROUP(x, *map(list, zip(*group)))
            errs = []
            for y, (packed, alpha, mu, b, p) in zip(outs, group):
                ref = ternary_linear_reference(x.double(), packed, alpha.double(), mu.double(),
                                               None if b is None else b.double(), p)
                errs.append(rel_err(y, ref) if bool(torch.isfinite(y).all()) else float("inf"))
            good = max(errs) < 1e-2
            ok &= good
            print(f"check {name} bias={bias} perm={perm}: worst member rel err {max(errs):.2e} "
                  f"{'ok' if good else 'FAIL'}", flush=True)
    return ok


def main():
    dev = "cuda"
    t0 = checked_gpu_run(check, dev)
    print("\n| group (batch 1) | perm | bf16 F.linear per member (us) | ternary_linear per member (us) "
          "| grouped (us) | grouped vs per member | grouped vs bf16 |\n|---|---|---|---|---|---|---|")
    for name, (sizes, k) in GROUPS.items():
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for n in sizes]
        dense_sets = rotating_copies(dense, sum(w.numel() * 2 for w in dense))
        t_bf16 = time_graph([lambda ws=ws: [F.linear(x, w) for w in ws] for ws in dense_sets],
                            max(len(dense_sets), 10))
        del dense, dense_sets
        for perm in (True, False):
            group = [m[:3] + (None, m[4]) for m in members(sizes, k, dev, perm=perm)]
            nbytes = sum(p.numel() * 4 + a.numel() * 4 for p, a, *_ in group)
            sets = rotating_copies([t for m in group for t in (m[0], m[1], m[2])], nbytes)
            perms = [m[4] for m in group]
            as_members = [[(s[3 * i], s[3 * i + 1], s[3 * i + 2], None, perms[i]) for i in range(len(group))]
                          for s in sets]
            reps = max(len(sets), 10)
            t_single = time_graph([lambda ms=ms: [OP(x, *m) for m in ms] for ms in as_members], reps)
            t_group = time_graph([lambda ms=ms: GROUP(x, *map(list, zip(*ms))) for ms in as_members], reps)
            print(f"| {name} | {'yes' if perm else 'no'} | {t_bf16 * 1e6:.1f} | {t_single * 1e6:.1f} | "
                  f"{t_group * 1e6:.1f} | {t_single / t_group:.2f}x | {t_bf16 / t_group:.2f}x |", flush=True)
            del sets, as_members, group
        torch.cuda.empty_cache()
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
