"""Command line: ``pt2pass demo`` (and ``python -m pt2pass demo``)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

import torch

from .config import TernaryConfig


def _demo(args) -> int:
    from .demo import DemoSettings, format_demo, run_demo

    ternary = TernaryConfig(method=args.method, order=args.order, compensation=args.compensation,
                            aga=not args.no_aga, block_size=args.block_size,
                            refine_rounds=args.refine_rounds)
    settings = DemoSettings(n_calib=args.n_calib, seqlen=args.seqlen, eval_windows=args.eval_windows,
                            new_tokens=args.new_tokens, ternary=ternary, sequential=args.sequential,
                            progress=not args.no_progress)
    print(format_demo(run_demo(settings)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pt2pass", description="Post-training ternarization "
                                     "(PT²-LLM) of LLMs as a PyTorch 2 pass pipeline.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-layer details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="ternarize the embedded SmolLM2-135M on Shakespeare and "
                          "report perplexity, sizes, generations and timings")
    demo.add_argument("--n-calib", type=int, default=32, help="calibration windows (default 32)")
    demo.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    demo.add_argument("--eval-windows", type=int, default=16,
                      help="held-out windows scored for perplexity (default 16)")
    demo.add_argument("--new-tokens", type=int, default=24, help="greedy tokens generated (default 24)")
    demo.add_argument("--method", default="pt2", choices=["pt2", "rtn", "gptq"])
    demo.add_argument("--order", default="ssr", choices=["ssr", "natural", "act_order"])
    demo.add_argument("--compensation", default="exact", choices=["exact", "diagonal", "none"])
    demo.add_argument("--no-aga", action="store_true", help="skip Activation-aware Grid Alignment")
    demo.add_argument("--block-size", type=int, default=128)
    demo.add_argument("--refine-rounds", type=int, default=0,
                      help="beyond the paper: rounds of Hessian-aware re-rounding of T (default 0)")
    demo.add_argument("--sequential", default="linear", choices=["linear", "stage"])
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
