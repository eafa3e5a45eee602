"""Ablation of PT²-LLM's parts and comparison with baselines on SmolLM2-135M (CPU is enough).

    python benchmarks/ablation.py                 # full table, written into docs/results.md
    python benchmarks/ablation.py --only full     # one configuration
    python benchmarks/ablation.py --only full act_order --seeds 0 1 2 3   # spread over calibration draws

Calibration: --n-calib windows x --seqlen tokens drawn from the calibration plays
(pt2pass.data.DEFAULT_CALIB_PLAYS). Perplexity: the first --eval-windows non-overlapping windows
of --seqlen tokens of the four held-out plays (DEFAULT_EVAL_PLAYS), tokenized once. Every
ternary configuration runs the whole pipeline (calibration, quantization, permutation passes and
lowering to pt2pass.ternary_linear); the GPTQ baselines keep dequantized weights in the graph.

With several --seeds every configuration runs once per calibration draw (the windows drawn by
``calibration_tensor(..., seed=s)``, and ``torch.manual_seed(s)``), and the table gives the
perplexity per seed with the median and the spread: at this level of damage a 135M model's
perplexity moves by tens of percent with the calibration sample and even with the CPU's float
rounding, so one run cannot rank configurations that are close. That table goes between its own
markers, leaving the one-seed table (which pt2pass.plots reads) as it is.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import time
from pathlib import Path

import torch

import pt2pass
from pt2pass import CompileConfig, TernaryConfig
from pt2pass.data import DEFAULT_CALIB_PLAYS, DEFAULT_EVAL_PLAYS, calibration_tensor
from pt2pass.eval.perplexity import eval_text_ids, perplexity
from pt2pass.models import load_smollm2, shakespeare_files
from pt2pass.sizes import bits_per_weight

NATURAL = dict(order="natural", compensation="none")
CONFIGS = {
    "rtn": ("RTN ternary (TWN, symmetric)", TernaryConfig(method="rtn", aga=False, **NATURAL)),
    "itf": ("ITF only (no calibration use)", TernaryConfig(aga=False, **NATURAL)),
    "itf_aga": ("ITF + AGA", TernaryConfig(aga=True, **NATURAL)),
    "gptq_itf": ("ITF, GPTQ compensation, natural order", TernaryConfig(aga=False, order="natural")),
    "gptq_itf_aga": ("ITF + AGA, GPTQ compensation, natural order", TernaryConfig(order="natural")),
    "gptq_itf_aga_diag": ("ITF + AGA, diagonal compensation, natural order",
                          TernaryConfig(order="natural", compensation="diagonal")),
    "act_order": ("ITF + AGA, GPTQ compensation, act-order", TernaryConfig(order="act_order")),
    "full": ("PT²-LLM: ITF + AGA + GPTQ compensation + SSR", TernaryConfig()),
    "full_refine": ("PT²-LLM + T refinement, 2 rounds (pt2pass, beyond the paper)",
                    TernaryConfig(refine_rounds=2)),
    "gptq2": ("GPTQ 2-bit g128", TernaryConfig(method="gptq", bits=2, order="natural")),
    "gptq3": ("GPTQ 3-bit g128", TernaryConfig(method="gptq", bits=3, order="natural")),
}
MARKERS = {"one": ("<!-- ablation:start -->", "<!-- ablation:end -->"),
           "seeds": ("<!-- ablation-seeds:start -->", "<!-- ablation-seeds:end -->")}


def run(args) -> list:
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    calib_text = shakespeare_files(DEFAULT_CALIB_PLAYS)
    eval_ids = eval_text_ids(tok, shakespeare_files(DEFAULT_EVAL_PLAYS))
    ppl_kw = dict(seqlen=args.seqlen, max_windows=args.eval_windows, progress=not args.quiet)
    rows = []
    if "fp" in args.only:
        r = perplexity(model, eval_ids, **ppl_kw)
        rows.append(dict(key="fp", name="full precision (fp32)", ppl=r.ppl, bits=32.0,
                         bits_trit=32.0, quant_s=0.0, tokens=r.n_tokens_scored, windows=r.n_windows,
                         seed=None))
        print(f"fp: {r.describe()}", flush=True)
    for seed in args.seeds:
        calib = calibration_tensor(calib_text, tok, seqlen=args.seqlen, n_samples=args.n_calib,
                                   seed=seed)
        for key in [k for k in CONFIGS if k in args.only]:
            name, ternary = CONFIGS[key]
            config = CompileConfig(ternary=ternary, seqlen=args.seqlen, sequential=args.sequential,
                                   seed=seed)
            torch.manual_seed(seed)
            start = time.perf_counter()
            qm = pt2pass.compile(model, calib, config=config, progress=not args.quiet)
            quant_s = time.perf_counter() - start
            r = perplexity(qm, eval_ids, **ppl_kw)
            rows.append(dict(key=key, name=name, ppl=r.ppl, bits=bits_per_weight(qm.store, "2bit"),
                             bits_trit=bits_per_weight(qm.store, "trit5"), quant_s=quant_s,
                             tokens=r.n_tokens_scored, windows=r.n_windows, seed=seed))
            print(f"{key} seed {seed}: {r.describe()} in {quant_s:.0f} s", flush=True)
    return rows


def _head(rows, args) -> str:
    seeds = " ".join(str(x) for x in args.seeds)
    return (f"SmolLM2-135M-Instruct (fp32 reference), calibration {args.n_calib} x {args.seqlen} "
            f"tokens from {', '.join(DEFAULT_CALIB_PLAYS)}; perplexity over {rows[0]['windows']} "
            f"windows x {args.seqlen} tokens ({rows[0]['tokens']:,} predicted tokens) of "
            f"{', '.join(DEFAULT_EVAL_PLAYS)}; sequential={args.sequential}; "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads.\n\n"
            f"Command: `python benchmarks/ablation.py --n-calib {args.n_calib} --seqlen {args.seqlen} "
            f"--eval-windows {args.eval_windows} --sequential {args.sequential}"
            + (f" --seeds {seeds}`\n\n" if len(args.seeds) > 1 else "`\n\n"))


def table(rows, args) -> str:
    """One row per configuration (one seed)."""
    lines = ["| configuration | perplexity | bits/weight (2-bit packed, in graph) | bits/weight (checkpoint) "
             "| quantize time (s) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ppl']:,.1f} | {r['bits']:.2f} | {r['bits_trit']:.2f} | "
                     f"{r['quant_s']:.0f} |")
    return _head(rows, args) + "\n".join(lines) + "\n"


def seeds_table(rows, args) -> str:
    """One row per configuration, a column per calibration seed, then the median and max / min."""
    seeds = args.seeds
    lines = ["| configuration | " + " | ".join(f"seed {s}" for s in seeds)
             + " | median | max / min | quantize time (s), median |",
             "|---|" + "---:|" * (len(seeds) + 3)]
    for key in dict.fromkeys(r["key"] for r in rows):
        mine = [r for r in rows if r["key"] == key]
        by_seed = {r["seed"]: r["ppl"] for r in mine}
        ppls = [r["ppl"] for r in mine]
        cells = [f"{by_seed[s]:,.1f}" if s in by_seed else "" for s in seeds]
        if key == "fp":  # seed-independent
            cells = [f"{ppls[0]:,.1f}"] * len(seeds)
        spread = max(ppls) / min(ppls)
        lines.append(f"| {mine[0]['name']} | " + " | ".join(cells)
                     + f" | {statistics.median(ppls):,.1f} | {spread:.2f} | "
                     + f"{statistics.median(r['quant_s'] for r in mine):.0f} |")
    return _head(rows, args) + "\n".join(lines) + "\n"


def write_results(text: str, path: Path, markers) -> None:
    start, end = markers
    old = path.read_text() if path.exists() else "# Results\n"
    block = f"{start}\n{text}{end}"
    if start in old:
        new = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n## Quantizer ablation (SmolLM2-135M, CPU)\n\n" + block + "\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n-calib", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--sequential", default="linear", choices=["linear", "stage"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="calibration draws (seeds of the window draw), one run of each "
                             "configuration per seed (default 0)")
    parser.add_argument("--only", nargs="+", default=["fp", *CONFIGS],
                        choices=["fp", *CONFIGS], help="configurations to run")
    parser.add_argument("--results", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--merge-json", type=Path, nargs="+",
                        help="build the table from rows saved by earlier --json runs (same settings) "
                             "instead of running")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.merge_json:
        rows = [r for path in args.merge_json for r in json.loads(path.read_text())]
        order = ["fp", *CONFIGS]
        rows.sort(key=lambda r: (order.index(r["key"]), r.get("seed") or 0))
        found = sorted({r["seed"] for r in rows if r.get("seed") is not None})
        if len(found) > 1 and sorted(args.seeds) != found:  # a per-seed table, whatever --seeds said
            args.seeds = found
    else:
        rows = run(args)
    mode = "seeds" if len(args.seeds) > 1 else "one"
    text = (seeds_table if mode == "seeds" else table)(rows, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.no_write:
        write_results(text, args.results, MARKERS[mode])


if __name__ == "__main__":
    main()
