"""``pt2pass report CHECKPOINT_OR_REPORT_JSON``: the per-layer table (and plots) again."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

from ..report import CHECKPOINT_META, CHECKPOINT_REPORT, format_layer_table, read_report
from .common import CliError, add_command

log = logging.getLogger(__name__)

DESCRIPTION = f"""Print the per-layer quantization table of a checkpoint or of a saved report,
and with --plots write its PNG plots.

CHECKPOINT_OR_REPORT_JSON is a pt2pass checkpoint folder (its {CHECKPOINT_REPORT}, else the report
inside {CHECKPOINT_META}), a report JSON written by `pt2pass quantize --report-json`, or a
checkpoint's {CHECKPOINT_META}. The SSR block-order heat maps need the checkpoint (its column
permutations; the checkpoint is loaded for them, which takes a few seconds). --ablation adds the plot of perplexity
against bits per weight from `benchmarks/ablation.py --json` output or from a markdown file with
the ablation table (docs/results.md)."""

EPILOG = """examples:
  pt2pass report ckpt/smollm2-ternary
  pt2pass report ckpt/smollm2-ternary --plots docs/img --ablation docs/results.md
  pt2pass report run1/report.json --plots plots/"""


def add_parser(sub) -> None:
    p = add_command(sub, "report", "per-layer table and plots of a checkpoint or report JSON",
                    DESCRIPTION, EPILOG, run)
    p.add_argument("source", metavar="CHECKPOINT_OR_REPORT_JSON", type=Path,
                   help="checkpoint folder or report JSON")
    p.add_argument("--plots", type=Path, metavar="DIR", help="write the PNG plots into DIR")
    p.add_argument("--ablation", type=Path, metavar="FILE",
                   help="ablation results (benchmarks/ablation.py --json, or docs/results.md) for "
                        "the perplexity-vs-bits plot")
    p.add_argument("--no-table", action="store_true", help="do not print the per-layer table")


def run(args) -> int:
    if not args.source.exists():
        raise CliError(f"{str(args.source)!r} does not exist; expected a pt2pass checkpoint folder "
                       "or a report JSON")
    if args.ablation and not args.plots:
        raise CliError("--ablation only feeds a plot: give --plots DIR too")
    try:
        rows, meta = read_report(args.source)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    if not args.no_table:
        print(format_layer_table(rows))
    if args.plots:
        written = _plots(rows, meta, args)
        print(f"wrote {len(written)} plots: {', '.join(str(p) for p in written)}")
    return 0


def _plots(rows, meta, args):
    from ..plots import read_ablation, write_plots

    ablation = None
    if args.ablation:
        try:
            ablation = read_ablation(args.ablation)
        except (OSError, ValueError) as e:
            raise CliError(f"--ablation {args.ablation}: {e}") from None
    folder = args.source if args.source.is_dir() else args.source.parent
    perms = _checkpoint_perms(folder)
    return write_plots(rows, args.plots, ablation, perms=perms,
                       block_size=_block_size(meta), caption=_caption(meta),
                       ablation_caption=f"Rows from {args.ablation}" if args.ablation else "")


def _checkpoint_perms(folder: Path) -> Optional[Dict[str, object]]:
    """Column permutations (None = natural order) of the checkpoint in ``folder``, through
    ``pt2pass.load`` (the stored format is the checkpoint module's business); None when
    ``folder`` holds no checkpoint or it cannot be loaded (the heat maps are then skipped)."""
    import pt2pass

    if not (folder / CHECKPOINT_META).is_file():
        log.info("no checkpoint beside the report: block-order heat maps skipped")
        return None
    try:
        store = pt2pass.load(folder).store
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        log.warning("cannot load the checkpoint %s for the block-order heat maps: %s", folder, e)
        return None
    return {fqn: layer.perm for fqn, layer in store.layers.items()}


def _ternary_settings(meta) -> dict:
    """The TernaryConfig fields: under "config" in report.json, "quantization" in pt2pass.json."""
    for section in ("config", "quantization"):
        ternary = (meta.get(section) or {}).get("ternary")
        if isinstance(ternary, dict):
            return ternary
    return {}


def _block_size(meta) -> int:
    return int(_ternary_settings(meta).get("block_size", 128))


def _caption(meta) -> str:
    model = meta.get("model") if isinstance(meta.get("model"), str) else meta.get("source")
    calib = meta.get("calibration") or {}
    ternary = _ternary_settings(meta)
    parts = []
    if model:
        parts.append(str(model))
    if ternary:
        parts.append(f"{ternary.get('method')} order={ternary.get('order')} "
                     f"compensation={ternary.get('compensation')} aga={ternary.get('aga')}")
    if isinstance(calib, dict) and calib.get("n_windows"):
        parts.append(f"calibration {calib['n_windows']} x {calib.get('seqlen')} tokens "
                     f"({calib.get('source', '')})")
    return "; ".join(parts)
