"""``pt2pass quantize MODEL OUT``: ternarize a model and save a checkpoint, report and plots."""
from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Dict, Optional

import torch

from ..data import DEFAULT_CALIB_PLAYS, calibration_tensor
from ..report import CHECKPOINT_REPORT, format_layer_table, write_report_json
from ..sizes import bits_per_weight
from .common import (CliError, add_command, add_device_arg, add_method_args, add_progress_arg,
                     add_text_column_arg, compile_config, format_times, has_config_field,
                     non_negative_int, positive_int, resolve_device, ternary_config, timed)
from .sources import EXPECTED_MODEL, is_checkpoint, load_model, require_tokenizer, text_paths

DESCRIPTION = f"""Ternarize MODEL with PT²-LLM and save a pt2pass checkpoint in the folder OUT.

MODEL is {EXPECTED_MODEL}. The Linear layers are calibrated on --n-calib windows of --seqlen
tokens drawn from --calib, quantized layer by layer and lowered to pt2pass.ternary_linear. OUT
receives the checkpoint (model.safetensors + pt2pass.json), the tokenizer and report.json (the
per-layer report); an earlier checkpoint there is replaced, any other non-empty folder refused.
The per-layer table and a summary (bits per weight, times) are printed."""

EPILOG = """examples:
  pt2pass quantize smollm2 ckpt/smollm2-ternary
  pt2pass quantize smollm2 /tmp/ck --n-calib 8 --seqlen 256 --plots docs/img
  pt2pass quantize ./my-hf-model out --calib data/ --device cuda --no-aga --order natural"""


def add_parser(sub) -> None:
    p = add_command(sub, "quantize", "ternarize a model and save a checkpoint",
                    DESCRIPTION, EPILOG, run)
    p.add_argument("model", metavar="MODEL", help="HF model folder, .gguf file, or smollm2")
    p.add_argument("out", metavar="OUT", type=Path, help="checkpoint folder to write")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", nargs="+", metavar="SOURCE",
                   help="calibration text: .txt/.json/.jsonl/.parquet files or folders, or "
                        "shakespeare:NAME,... (default: the embedded Shakespeare calibration plays "
                        f"{', '.join(DEFAULT_CALIB_PLAYS)})")
    add_text_column_arg(c)
    c.add_argument("--n-calib", type=positive_int, default=32, metavar="N",
                   help="calibration windows drawn from the text (default 32)")
    c.add_argument("--seqlen", type=positive_int, default=512, metavar="TOKENS",
                   help="tokens per calibration window (default 512)")
    c.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="windows run through the model at once; speed/memory only (default 8)")
    c.add_argument("--seed", type=non_negative_int, default=0, metavar="N",
                   help="seed of the window draw and of torch (default 0)")
    add_method_args(p)
    p.add_argument("--keep", nargs="*", default=["lm_head"], metavar="SUBSTRING",
                   help="weight FQN substrings of Linears kept in full precision (default lm_head; "
                        "--keep with no value quantizes every Linear)")
    p.add_argument("--quantize-routers", action="store_true",
                   help="ternarize MoE routers too (by default the Linear whose logits pick each "
                        "token's experts stays in full precision)")
    if has_config_field("offload_activations"):
        p.add_argument("--offload-activations", action="store_true",
                       help="keep calibration activations on the CPU between layers (less device "
                            "memory, slower)")
    add_device_arg(p)
    o = p.add_argument_group("output")
    o.add_argument("--report-json", type=Path, metavar="PATH",
                   help=f"per-layer report (default OUT/{CHECKPOINT_REPORT})")
    o.add_argument("--plots", type=Path, metavar="DIR", help="also write the report's PNG plots "
                   "into DIR")
    add_progress_arg(p)


def run(args) -> int:
    import pt2pass

    _check_out(args.out)
    _check_outputs(args.plots, args.report_json)
    ternary = ternary_config(args)
    config = compile_config(args, ternary)
    device = resolve_device(args.device)
    calib_paths, calib_desc = text_paths(args.calib, DEFAULT_CALIB_PLAYS)
    times: Dict[str, float] = {}
    torch.manual_seed(args.seed)
    with timed(times, "load"):
        loaded = load_model(args.model, device, allow_checkpoint=False)
    tok = require_tokenizer(loaded, "tokenize the calibration text")
    with timed(times, "tokenize"):
        ids = calibration_tensor(calib_paths, tok, seqlen=args.seqlen, n_samples=args.n_calib,
                                 seed=args.seed, text_column=args.text_column,
                                 vocab_size=getattr(loaded.model.config, "vocab_size", None))
    with timed(times, "quantize"):
        qm = pt2pass.compile(loaded.model, ids, config=config, progress=not args.no_progress)
    calibration = {"source": calib_desc, "files": [str(p) for p in calib_paths],
                   "n_windows": int(ids.shape[0]), "seqlen": args.seqlen, "seed": args.seed}
    with timed(times, "save"):
        pt2pass.save(qm, args.out, source=args.model, calibration=calibration)
        tok.save_pretrained(str(args.out))
        if getattr(loaded.model, "generation_config", None) is not None:
            # its eos ids (several for some models) stop `pt2pass generate` as they stop HF's generate
            loaded.model.generation_config.save_pretrained(str(args.out))
    rows = qm.report()
    summary = _summary(qm, ternary, times)
    report_path = args.report_json or args.out / CHECKPOINT_REPORT
    write_report_json(rows, report_path, extra={
        "source": args.model, "model": loaded.description, "calibration": calibration,
        "config": {"ternary": vars(ternary), "sequential": args.sequential, "keep": args.keep,
                   "batch_size": args.batch_size, "device": str(device)},
        "summary": summary, "environment": _environment()})
    written = []
    if args.plots:
        from ..plots import write_plots

        caption = (f"{loaded.description}; {ternary.method} order={ternary.order} "
                   f"compensation={ternary.compensation} aga={ternary.aga}; calibration "
                   f"{ids.shape[0]} x {args.seqlen} tokens ({calib_desc})")
        perms = {fqn: layer.perm for fqn, layer in qm.store.layers.items()}
        written = write_plots(rows, args.plots, perms=perms, block_size=ternary.block_size,
                              caption=caption)
    print(format_layer_table(rows))
    print()
    print(f"pt2pass quantize: {loaded.description} -> {args.out}")
    print(f"method: {ternary.method} (order={ternary.order}, compensation={ternary.compensation}, "
          f"aga={ternary.aga}, block={ternary.block_size}, refine_rounds={ternary.refine_rounds}), "
          f"sequential={args.sequential}, kept in full precision: {', '.join(args.keep) or 'none'}")
    print(f"calibration: {ids.shape[0]} windows x {args.seqlen} tokens from {calib_desc}; "
          f"seed {args.seed}; device {device}")
    print(f"{summary['n_layers']} quantized Linears, {summary['n_weights'] / 1e6:.1f}M weights: "
          f"{_size(summary, ternary)}; {qm.ternary_node_count()} pt2pass.ternary_linear nodes"
          + (f", {qm.experts_node_count()} pt2pass.ternary_experts nodes" if qm.experts_node_count() else ""))
    print(f"time: {format_times(times)}")
    print(f"wrote: checkpoint {args.out}, report {report_path}"
          + (f", plots {', '.join(str(p) for p in written)}" if written else ""))
    return 0


def _check_out(out: Path) -> None:
    """Refuse an OUT that pt2pass.save would refuse, before any work."""
    if out.exists() and not out.is_dir():
        raise CliError(f"OUT {str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_checkpoint(out):
        raise CliError(f"OUT {str(out)!r} is a non-empty folder that is not a pt2pass "
                       "checkpoint; refusing to replace it")


def _check_outputs(plots: Optional[Path], report_json: Optional[Path]) -> None:
    """Refuse unusable --plots / --report-json paths before the minutes of quantization."""
    if plots is not None and plots.exists() and not plots.is_dir():
        raise CliError(f"--plots {str(plots)!r} exists and is not a folder")
    if report_json is not None and report_json.is_dir():
        raise CliError(f"--report-json {str(report_json)!r} is a folder; name a file")


def _size(summary: dict, ternary) -> str:
    if ternary.method == "gptq":
        return f"{summary['bits_per_weight']:.2f} bits/weight all-in ({ternary.bits}-bit codes)"
    return (f"{summary['bits_per_weight']:.2f} bits/weight all-in with 2-bit codes "
            f"({summary['bits_per_weight_trit5']:.2f} in the checkpoint: 5 trits/byte, bit-packed permutations)")


def _summary(qm, ternary, times) -> dict:
    n_weights = sum(math.prod(layer.shape) for layer in qm.store.layers.values())  # experts: E x N x K
    return {"n_layers": len(qm.store), "n_weights": n_weights,
            "bits_per_weight": bits_per_weight(qm.store, "2bit"),
            "bits_per_weight_trit5": bits_per_weight(qm.store, "trit5"),
            "method": ternary.method, "seconds": dict(times)}


def _environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads()}
