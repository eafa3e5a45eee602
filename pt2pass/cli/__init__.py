"""Command line: ``pt2pass <command>`` (also ``python -m pt2pass <command>``).

One module per command, each with ``add_parser(subparsers)`` and ``run(args) -> exit status``.
User errors (bad paths, contradictory options, library ValueErrors) print one line
``pt2pass <command>: error: ...`` and exit with status 2; ``-v`` adds the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

import torch

from . import bench, demo, evaluate, export, generate, quantize, report
from .common import CliError

log = logging.getLogger(__name__)

COMMANDS = (quantize, evaluate, generate, export, report, bench, demo)
# OSError: paths the user named that cannot be written or read (a file where a folder is
# needed, a folder where a file is, no permission); -v still shows the traceback
USER_ERRORS = (CliError, ValueError, OSError)
EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pt2pass", description="Post-training ternarization (PT²-LLM) of LLMs as a PyTorch 2 "
        "pass pipeline. Run `pt2pass COMMAND --help` for a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log per-layer details (and tracebacks of errors)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    if getattr(args, "no_progress", False):
        _hide_library_progress_bars()
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.verbose:
            log.exception("pt2pass %s failed", args.command)
        print(f"pt2pass {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        # Point stdout at devnull so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _hide_library_progress_bars() -> None:
    """--no-progress also silences the bars of transformers (weight loading) and datasets."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
