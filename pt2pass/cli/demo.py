"""``pt2pass demo``: the main job on the embedded SmolLM2-135M and Shakespeare (pt2pass.demo)."""
from __future__ import annotations


from ..data import DEFAULT_CALIB_PLAYS, DEFAULT_EVAL_PLAYS
from .common import (add_command, add_method_args, add_progress_arg, non_negative_int, positive_int,
                     ternary_config)

DESCRIPTION = f"""Ternarize the embedded SmolLM2-135M-Instruct on Shakespeare and report perplexity
before and after, Linear weight sizes, greedy generations and the time of each stage.

Calibration: --n-calib windows of --seqlen tokens from {', '.join(DEFAULT_CALIB_PLAYS)}.
Perplexity: the first --eval-windows windows of the held-out plays
{', '.join(DEFAULT_EVAL_PLAYS)}. 3-7 minutes on 2 CPU cores with the defaults."""

EPILOG = """examples:
  pt2pass demo
  pt2pass demo --n-calib 128
  pt2pass demo --seed 1
  pt2pass demo --no-aga --order natural --n-calib 8 --seqlen 256"""


def add_parser(sub) -> None:
    p = add_command(sub, "demo", "ternarize the embedded SmolLM2-135M on Shakespeare and "
                       "report perplexity, sizes, generations and timings",
                    DESCRIPTION, EPILOG, run)
    p.add_argument("--n-calib", type=positive_int, default=32, metavar="N",
                   help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=positive_int, default=512, metavar="TOKENS",
                   help="tokens per window (default 512)")
    p.add_argument("--eval-windows", type=positive_int, default=64, metavar="N",
                   help="held-out windows scored for perplexity (default 64; fewer are quicker "
                        "but noisier)")
    p.add_argument("--new-tokens", type=non_negative_int, default=24, metavar="N",
                   help="greedy tokens generated (default 24)")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="N",
                   help="seed of the calibration window draw and of torch (default 0)")
    add_method_args(p)
    add_progress_arg(p)


def run(args) -> int:
    from ..demo import DemoSettings, format_demo, run_demo

    settings = DemoSettings(n_calib=args.n_calib, seqlen=args.seqlen,
                            eval_windows=args.eval_windows, new_tokens=args.new_tokens,
                            ternary=ternary_config(args),
                            sequential=args.sequential, progress=not args.no_progress,
                            seed=args.seed)
    print(format_demo(run_demo(settings)))
    return 0
