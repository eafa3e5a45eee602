"""How much does one layer's quantization move when its Hessian moves by float rounding?

The demo's perplexity after ternarization differs between CPUs (484.35 on one machine, 791.01 on
another, same commit and inputs) and between calibration draws. This script asks where that can
start: it captures H for a few SmolLM2 Linears from real calibration text, quantizes each with H
and with H perturbed by a relative 2^-23 (one float32 ulp, what a different matmul summation order
gives), and reports the fraction of the integer codes that changed and the relative change
of the layer's output error E_x = tr(E H E^T). Methods: PT²-LLM in each block order and GPTQ 3-bit
as the control. With --compare it instead reads two checkpoints of the same model (e.g. one
`pt2pass quantize` run with ATEN_CPU_CAPABILITY=avx2 and one without) and prints, per decoder
block, the fraction of codes that differ: how a difference grows along the true-sequential
calibration. Run on the CPU:

    python benchmarks/experiments/sensitivity.py [--layers 0 15 29] [--windows 8]
    python benchmarks/experiments/sensitivity.py --compare CKPT_A CKPT_B
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch

import pt2pass
from pt2pass import TernaryConfig
from pt2pass.data import DEFAULT_CALIB_PLAYS, calibration_tensor
from pt2pass.models import load_smollm2, shakespeare_files
from pt2pass.quant.gptq import ternarize_weight
from pt2pass.quant.hessian import HessianAccumulator
from pt2pass.quant.result import unpermute

METHODS = {
    "pt2 ssr": TernaryConfig(),
    "pt2 natural": TernaryConfig(order="natural"),
    "pt2 act_order": TernaryConfig(order="act_order"),
    "gptq 3-bit": TernaryConfig(method="gptq", bits=3, order="natural"),
}


def capture(model, ids: torch.Tensor, names) -> dict:
    """H of the named Linears over the windows ``ids`` (full-precision model)."""
    mods = dict(model.named_modules())
    accs, hooks = {}, []
    for name in names:
        lin = mods[name]
        accs[name] = HessianAccumulator(lin.in_features)
        hooks.append(lin.register_forward_hook(lambda m, a, o, acc=accs[name]: acc.add(a[0])))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    return {name: acc.hessian() for name, acc in accs.items()}


def perturbed(H: torch.Tensor, seed: int) -> torch.Tensor:
    """H * (1 + 2^-23 u), u in {-1, 1} symmetric: one float32 ulp of relative noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2, H.shape, generator=g).to(H.dtype) * 2 - 1
    u = torch.triu(u) + torch.triu(u, 1).T
    return H * (1 + u * 2.0 ** -23)


def codes(res) -> torch.Tensor:
    """The integer codes in the original column order (T is stored in quantization order)."""
    return unpermute(res.T, res.perm)


def compare(path_a, path_b) -> None:
    """Per decoder block: the fraction of the codes of its Linears that differ between the two
    checkpoints, and the largest fraction of any one of them."""
    a, b = pt2pass.load(path_a).store, pt2pass.load(path_b).store
    if sorted(a) != sorted(b):
        raise SystemExit(f"{path_a} and {path_b} quantize different Linears")
    blocks = defaultdict(list)
    for fqn in a:
        match = re.search(r"layers\.(\d+)\.", fqn)
        changed = (codes(a[fqn]) != codes(b[fqn])).double()
        blocks[int(match.group(1)) if match else -1].append((fqn, changed.sum().item(), changed.numel(),
                                                            changed.mean().item()))
    print("| decoder block | codes changed | most in one Linear |\n|---|---:|---:|")
    for block, rows in sorted(blocks.items()):
        frac = sum(r[1] for r in rows) / sum(r[2] for r in rows)
        worst = max(rows, key=lambda r: r[3])
        linear = worst[0].removesuffix(".weight").rsplit(".", 1)[-1]
        print(f"| {block} | {frac:.2%} | {worst[3]:.2%} ({linear}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--linears", nargs="+", default=["self_attn.q_proj", "mlp.down_proj"])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--compare", nargs=2, metavar="CKPT", help="compare two checkpoints' codes")
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    torch.manual_seed(0)
    model, tok = load_smollm2()
    ids = calibration_tensor(shakespeare_files(DEFAULT_CALIB_PLAYS), tok, seqlen=512,
                             n_samples=args.windows)
    names = [f"model.layers.{i}.{lin}" for i in args.layers for lin in args.linears]
    hessians = capture(model, ids, names)
    mods = dict(model.named_modules())
    print("| layer | method | codes changed | E_x relative change |\n|---|---|---:|---:|")
    for name in names:
        W, H = mods[name].weight.detach(), hessians[name]
        for method, config in METHODS.items():
            a = ternarize_weight(W, H, config)
            b = ternarize_weight(W, perturbed(H, 1), config)
            changed = (codes(a) != codes(b)).double().mean().item()
            ex_a, ex_b = a.stats["E_x"], b.stats["E_x"]
            print(f"| {name} | {method} | {changed:.2%} | {(ex_b - ex_a) / ex_a:+.2e} |", flush=True)


if __name__ == "__main__":
    main()
