"""``pt2pass export CHECKPOINT OUT.pt2``: a torch.export program with pt2pass ops."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..decode import OneTokenStepError
from ..lowering.group_siblings import describe_ternary_ops
from .common import CliError, add_command, add_device_arg, positive_int, resolve_device
from .sources import load_checkpoint

DESCRIPTION = """Export a pt2pass checkpoint with torch.export and save it as a .pt2 file.

By default the program computes the logits of the full sequence (dynamic batch and sequence
length). With --decode it is the static-KV-cache step instead: (input_ids (B, S), cache_position
(S,)) -> logits of the last position, S in [1, --max-cache-len], the cache held in the program's
buffers and written in place (generate with pt2pass.decode.generate_with_program); with --padded
the step also takes attention_mask (B, max cache length) and position_ids (B, S), for left-padded
prompts of different lengths (and for models such as OPT, whose plain step cannot run one token). The full
program holds one pt2pass.ternary_linear node per ternarized Linear; the decode step holds one
pt2pass.ternary_linear_group node per group of Linears reading the same input (q/k/v, gate/up) and
one pt2pass.ternary_linear node per other Linear. Load it in any process with `import pt2pass`
(registers the ops) and `torch.export.load(path)`.

Unless --no-verify is given, the saved file is loaded back and checked against the checkpoint:
the full-sequence logits on a short input, or the greedy tokens generated with the decode
program."""

EPILOG = """examples:
  pt2pass export ckpt/smollm2-ternary smollm2-ternary.pt2
  pt2pass export ckpt/smollm2-ternary decode.pt2 --decode --max-cache-len 512
  pt2pass export ckpt/smollm2-ternary decode.pt2 --decode --max-cache-len 512 --batch-size 4 --padded"""

VERIFY_TOKENS = 8


def add_parser(sub) -> None:
    p = add_command(sub, "export", "torch.export a checkpoint to a .pt2 file",
                    DESCRIPTION, EPILOG, run)
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=Path, help="pt2pass checkpoint folder")
    p.add_argument("out", metavar="OUT.pt2", type=Path, help="file to write")
    p.add_argument("--decode", action="store_true",
                   help="export the decode step with its static KV cache instead of the "
                        "full-sequence graph")
    p.add_argument("--max-cache-len", type=positive_int, default=None, metavar="TOKENS",
                   help="with --decode: prompt + generated tokens the cache holds (required)")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="with --decode: sequences decoded at once, fixed in the program (default 1)")
    p.add_argument("--padded", action="store_true",
                   help="with --decode: the step also takes attention_mask and position_ids (left padding)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip loading the saved program back and comparing its logits")
    add_device_arg(p)


def run(args) -> int:
    import pt2pass

    if args.out.suffix != ".pt2":
        raise CliError(f"OUT {str(args.out)!r} must end in .pt2 (torch.export.save's format)")
    if args.out.is_dir():
        raise CliError(f"OUT {str(args.out)!r} is a folder")
    if args.decode and args.max_cache_len is None:
        raise CliError("--decode needs --max-cache-len (prompt + new tokens the cache holds)")
    if not args.decode and (args.max_cache_len is not None or args.padded):
        raise CliError("--max-cache-len and --padded only apply with --decode")
    if args.decode and not args.no_verify and args.max_cache_len <= VERIFY_TOKENS:
        # refused before exporting: nothing is written that could not be verified
        raise CliError(f"--max-cache-len {args.max_cache_len} leaves no room to verify after a "
                       f"{VERIFY_TOKENS}-token prompt; use --no-verify or a larger cache")
    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, device)
    start = time.perf_counter()
    if args.decode:
        try:
            ep = pt2pass.export(loaded.model, graph="decode", batch_size=args.batch_size,
                                max_cache_len=args.max_cache_len, padded=args.padded)
        except OneTokenStepError as e:
            raise CliError(f"{e} (--padded)") from e
    else:
        ep = pt2pass.export(loaded.model)
    export_s = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(args.out))
    print(f"exported {loaded.description} ({'decode step' if args.decode else 'full sequence'}) "
          f"in {export_s:.1f} s: {describe_ternary_ops(ep.graph)}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); load it with "
          f"`import pt2pass, torch; torch.export.load({str(args.out)!r})`")
    if args.no_verify:
        return 0
    if args.decode:
        n = _verify_decode(loaded.model, args.out, device, args.batch_size, args.max_cache_len)
        print(f"verified: the loaded decode program generates the checkpoint's greedy tokens "
              f"({n} new tokens after a {VERIFY_TOKENS}-token prompt)")
    else:
        diff = _verify(loaded.model, args.out, device)
        print(f"verified: loaded program's logits match the checkpoint's (max |diff| {diff:.2e} "
              f"on {VERIFY_TOKENS} tokens)")
    return 0


def _verify_decode(qm, path: Path, device, batch_size: int, max_cache_len: int) -> int:
    from ..decode import generate_with_program

    n_new = min(4, max_cache_len - VERIFY_TOKENS)  # >= 1: checked before the export
    ids = torch.arange(1, VERIFY_TOKENS + 1, device=device).repeat(batch_size, 1)
    want = qm.generate(ids, n_new)
    got = generate_with_program(torch.export.load(str(path)), ids, n_new)
    if not torch.equal(got, want):
        raise CliError("the saved decode program generates other tokens than the checkpoint: "
                       f"{got[0, VERIFY_TOKENS:].tolist()} vs {want[0, VERIFY_TOKENS:].tolist()}")
    return n_new


def _verify(qm, path: Path, device) -> float:
    ids = torch.arange(1, VERIFY_TOKENS + 1, device=device).unsqueeze(0)
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        want = qm(ids).logits
        out = loaded(ids)
    got = out.logits if hasattr(out, "logits") else out[0]
    diff = float((got - want).abs().max())
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise CliError(f"the saved program's logits differ from the checkpoint's by up to "
                       f"{diff:.3e}")
    return diff
