"""``pt2pass bench``: time pt2pass.ternary_linear against dense F.linear on this machine."""
from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import torch

from ..bench import bench_ternary_vs_dense, format_bench_table
from ..report import json_safe
from .common import CliError, add_command, add_device_arg, positive_int, resolve_device

DESCRIPTION = """Time pt2pass.ternary_linear against a dense F.linear of the same (dequantized)
weight, for random ternary layers of the given shapes and batch sizes, after checking the op's
result against a float64 product.

On CUDA both run inside CUDA graphs that cycle through >= 200 MB of weight copies (so no call
reads its weight from L2) and the op runs the Triton kernels. On CPU the op runs its plain-torch
reference path (unpack the codes, dequantize, matmul), so it is slower than dense there: the CPU
numbers measure the reference, not a kernel. The path that ran is printed on every row."""

EPILOG = """examples:
  pt2pass bench                                  # SmolLM2-135M's shapes at M = 1, 16
  pt2pass bench --shapes 4096x4096 14336x4096 --m 1 16 256 --device cuda"""

SMOLLM2_SHAPES = ((576, 576), (1536, 576), (576, 1536))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shape(text: str):
    m = re.fullmatch(r"(\d+)[xX](\d+)", text)
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape NxK (out x in features), e.g. "
                                         "4096x4096")
    n, k = int(m.group(1)), int(m.group(2))
    if k % 16:
        raise argparse.ArgumentTypeError(f"{text}: K={k} must be a multiple of 16 (the packing "
                                         "unit)")
    return n, k


def add_parser(sub) -> None:
    p = add_command(sub, "bench", "time the ternary op against dense F.linear",
                    DESCRIPTION, EPILOG, run)
    p.add_argument("--shapes", nargs="+", type=shape, default=list(SMOLLM2_SHAPES),
                   metavar="NxK", help="weight shapes, out x in features, K a multiple of 16 "
                   "(default: SmolLM2-135M's 576x576 1536x576 576x1536; the Triton kernels need "
                   "K a multiple of 128, other K run the reference on CUDA too)")
    p.add_argument("--m", nargs="+", type=positive_int, default=[1, 16], metavar="M",
                   help="rows of x (batch x tokens) (default 1 16)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="activation and scale dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--repeats", type=positive_int, default=20, metavar="N",
                   help="timed calls per measurement on CPU, median taken (default 20)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    add_device_arg(p)


def run(args) -> int:
    import pt2pass  # noqa: F401  (registers the op)

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda"
                                                    else torch.float32)
    cpu = platform.processor() or platform.machine()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu} CPU, {torch.get_num_threads()} threads")
    print(f"pt2pass bench on {where}; torch {torch.__version__}; "
          f"{str(dtype).removeprefix('torch.')} activations")
    try:
        rows = bench_ternary_vs_dense(args.shapes, args.m, device, dtype, repeats=args.repeats)
    except ValueError as e:
        raise CliError(str(e)) from None
    print(format_bench_table(rows))
    if device.type == "cpu":
        print("CPU: ternary_linear ran its plain-torch reference (dequantizes the weight on every "
              "call); the Triton kernels run only on CUDA.")
    if args.json:
        args.json.write_text(json.dumps(json_safe({"device": where, "dtype": str(dtype),
                                                   "rows": [r.as_dict() for r in rows]}), indent=1))
        print(f"wrote {args.json}")
    return 0
