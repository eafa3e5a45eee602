"""Argument types and option groups shared by the subcommands."""
from __future__ import annotations

import argparse
import dataclasses
import textwrap
import time
from contextlib import contextmanager
from typing import Dict

import torch

from ..config import (COMPENSATIONS, METHODS, ORDERS, SEQUENTIAL_MODES, CompileConfig,
                      TernaryConfig)


class CliError(Exception):
    """A user error: printed as ``pt2pass <command>: error: <message>``, exit status 2."""


def add_command(sub, name: str, help: str, description: str, epilog: str, run):
    """A subparser whose description paragraphs are re-wrapped and whose epilog (examples) is
    kept as written."""
    paragraphs = [textwrap.fill(" ".join(p.split()), width=88, break_on_hyphens=False)
                  for p in description.strip().split("\n\n")]
    p = sub.add_parser(name, help=help, description="\n\n".join(paragraphs), epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run)
    return p


def _number(cast, accept, requirement: str, kind: str):
    """An argparse ``type`` parsing ``cast`` values that satisfy ``accept``."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{value} must be {requirement}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer", "an integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0", "an integer")
positive_float = _number(float, lambda v: v > 0, "a positive number", "a number")


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """The quantizer switches (TernaryConfig and the sequential mode), as in ``pt2pass demo``."""
    g = parser.add_argument_group("method")
    g.add_argument("--method", default="pt2", choices=METHODS,
                   help="pt2: PT²-LLM ternary (default); rtn: symmetric ternary, no calibration; "
                        "gptq: GPTQ baseline (--bits, not lowered to the ternary op)")
    g.add_argument("--bits", type=positive_int, default=2, metavar="N",
                   help="bit width of --method gptq (default 2)")
    g.add_argument("--order", default="ssr", choices=ORDERS,
                   help="block order: ssr (structural similarity, default), natural, act_order")
    g.add_argument("--no-ssr", action="store_true", help="same as --order natural")
    g.add_argument("--compensation", default="exact", choices=COMPENSATIONS,
                   help="GPTQ-style error compensation of the remaining columns (default exact)")
    g.add_argument("--no-aga", action="store_true", help="skip Activation-aware Grid Alignment")
    g.add_argument("--block-size", type=positive_int, default=128, metavar="N",
                   help="columns per (alpha, mu) block, a multiple of 16 (default 128)")
    g.add_argument("--refine-rounds", type=non_negative_int, default=0, metavar="N",
                   help="beyond the paper, experimental: rounds of Hessian-aware re-rounding of T "
                        "(default 0; needs --compensation exact)")
    g.add_argument("--sequential", default="linear", choices=SEQUENTIAL_MODES,
                   help="linear: each Linear calibrated on the outputs of the already quantized "
                        "ones (default); stage: a decoder block at a time from full-precision "
                        "inputs")


def ternary_config(args) -> TernaryConfig:
    order = "natural" if args.no_ssr else args.order
    if args.no_ssr and args.order not in ("ssr", "natural"):
        raise CliError(f"--no-ssr contradicts --order {args.order}")
    try:
        return TernaryConfig(method=args.method, order=order, compensation=args.compensation,
                             aga=not args.no_aga, block_size=args.block_size,
                             refine_rounds=args.refine_rounds, bits=args.bits)
    except ValueError as e:
        raise CliError(str(e)) from None


def compile_config(args, ternary: TernaryConfig) -> CompileConfig:
    kwargs = dict(ternary=ternary, seqlen=args.seqlen, batch_size=args.batch_size,
                  sequential=args.sequential, skip=tuple(args.keep), seed=args.seed)
    if getattr(args, "offload_activations", False):
        kwargs["offload_activations"] = True
    if getattr(args, "quantize_routers", False):
        kwargs["keep_routers"] = False
    try:
        return CompileConfig(**kwargs)
    except ValueError as e:
        raise CliError(str(e)) from None


def has_config_field(name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(CompileConfig))


def add_text_column_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-column", default="text", metavar="FIELD",
                        help="field holding the text in .json/.jsonl/.parquet files (default text)")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="where the model runs: cpu (default), cuda or cuda:N")


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine (torch "
                       f"{torch.__version__})")
    return device


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


@contextmanager
def timed(times: Dict[str, float], name: str):
    """Record the wall time of the ``with`` body under ``times[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = time.perf_counter() - start


def format_times(times: Dict[str, float]) -> str:
    parts = [f"{name} {sec:.1f} s" for name, sec in times.items()]
    return ", ".join(parts) + f"; total {sum(times.values()):.1f} s"
