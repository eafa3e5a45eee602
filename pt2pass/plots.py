"""PNG plots of a quantization report (and of the ablation results).

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never
through pyplot: no global backend switch, no GUI, safe in tests and servers.

- ``itf_convergence.png``: E_w per ITF iteration (relative to the ATQ start) for a sample of
  layers, and the spread over all layers.
- ``aga_error.png``: per-layer E_x after ITF against after AGA, and AGA's change per block.
- ``block_order.png``: how far the SSR block order is from the natural one, per layer, and (when
  the permutations are given) when each input column was quantized.
- ``ablation_ppl_bits.png``: perplexity against bits/weight of the ablation's methods.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from .report import short_name

log = logging.getLogger(__name__)

DPI = 110
ABLATION_START, ABLATION_END = "<!-- ablation:start -->", "<!-- ablation:end -->"
# Line styles that tell the sampled depths apart in the convergence plot.
DEPTH_STYLES = ("-", "--", ":")
MARKERS = "osD^v<>pP*Xh"


def layer_position(fqn: str) -> Tuple[Optional[int], str]:
    """(decoder block index, kind) of a weight FQN: "model.layers.3.mlp.down_proj.weight" ->
    (3, "mlp.down_proj"); a name without a block index gives (None, name)."""
    name = short_name(fqn)
    m = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def _kinds(rows) -> List[str]:
    seen: Dict[str, None] = {}
    for r in rows:
        seen.setdefault(layer_position(r["layer"])[1], None)
    return list(seen)


def _colors(kinds: Sequence[str]) -> Dict[str, Any]:
    cmap = colormaps["tab10" if len(kinds) <= 10 else "tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(kinds)}


def _num(row, key) -> Optional[float]:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    log.info("wrote %s", path)
    return path


def _per_kind(rows, key) -> Dict[str, Tuple[List[int], List[float]]]:
    """kind -> (block indices, values of ``key``) for rows that have both."""
    out: Dict[str, Tuple[List[int], List[float]]] = {}
    for r in rows:
        block, kind = layer_position(r["layer"])
        v = key(r) if callable(key) else _num(r, key)
        if block is None or v is None:
            continue
        xs, ys = out.setdefault(kind, ([], []))
        xs.append(block)
        ys.append(v)
    return out


def _relative_histories(rows) -> Dict[str, List[float]]:
    out = {}
    for r in rows:
        h = r.get("E_w_itf_history")
        if isinstance(h, list) and len(h) >= 2 and isinstance(h[0], (int, float)) and h[0] > 0:
            out[r["layer"]] = [float(v) / h[0] for v in h]
    return out


def plot_itf_convergence(rows, path: Path, caption: str = "") -> Optional[Path]:
    hist = _relative_histories(rows)
    if not hist:
        log.info("no ITF histories in the report (method without ITF, or an older report): "
                 "skipping %s", path.name)
        return None
    blocks = sorted({b for b, _ in (layer_position(f) for f in hist) if b is not None})
    sample_blocks = sorted({blocks[0], blocks[len(blocks) // 2], blocks[-1]}) if blocks else []
    kinds = _kinds([{"layer": f} for f in hist])
    colors = _colors(kinds)
    fig = Figure(figsize=(13, 5.2))
    left, right = fig.subplots(1, 2)
    for fqn, rel in hist.items():
        block, kind = layer_position(fqn)
        if block not in sample_blocks:
            continue
        style = DEPTH_STYLES[sample_blocks.index(block) % len(DEPTH_STYLES)]
        left.plot(range(len(rel)), rel, style, color=colors[kind], lw=1.6, marker=".", ms=4)
    kind_handles = [left.plot([], [], "-", color=colors[k], lw=2, label=k)[0] for k in kinds]
    depth_handles = [left.plot([], [], DEPTH_STYLES[i % len(DEPTH_STYLES)], color="0.3",
                               label=f"block {b}")[0] for i, b in enumerate(sample_blocks)]
    leg = left.legend(handles=kind_handles, loc="upper right", fontsize=8, title="layer")
    left.add_artist(leg)
    left.legend(handles=depth_handles, loc="lower right", bbox_to_anchor=(1.0, 0.1), fontsize=8,
                title="depth")
    left.set_title(f"ITF convergence, sampled layers (blocks {', '.join(map(str, sample_blocks))})")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("ITF iteration (0 = ATQ start)")
    left.set_ylabel("E_w / E_w at ATQ start")
    left.grid(alpha=0.3)

    length = max(len(v) for v in hist.values())
    padded = np.array([v + [v[-1]] * (length - len(v)) for v in hist.values()])
    it = np.arange(length)
    lo, med, hi = np.percentile(padded, [10, 50, 90], axis=0)
    right.fill_between(it, lo, hi, color="C0", alpha=0.25, label="10-90 % of layers")
    right.plot(it, med, "-o", color="C0", ms=3, label="median")
    right.plot(it, padded.min(0), ":", color="0.4", lw=1, label="min / max")
    right.plot(it, padded.max(0), ":", color="0.4", lw=1)
    right.set_title(f"all {len(hist)} layers (a layer that converged keeps its last E_w)")
    right.set_xlabel("ITF iteration (0 = ATQ start)")
    right.set_ylabel("E_w / E_w at ATQ start")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    _caption(fig, caption, "E_w: ITF's weight error of each block of the compensated weight, "
             "summed over the layer's blocks.")
    return _save(fig, path)


def plot_aga_error(rows, path: Path, caption: str = "") -> Optional[Path]:
    pts = [(r, _num(r, "E_x_itf"), _num(r, "E_x_aga")) for r in rows]
    pts = [(r, a, b) for r, a, b in pts if a is not None and b is not None and a > 0 and b > 0]
    if not pts:
        log.info("no E_x after ITF and after AGA in the report (no AGA or no calibration): "
                 "skipping %s", path.name)
        return None
    kinds = _kinds([r for r, _, _ in pts])
    colors = _colors(kinds)
    fig = Figure(figsize=(13, 5.2))
    left, right = fig.subplots(1, 2)
    for kind in kinds:
        xs = [a for r, a, _ in pts if layer_position(r["layer"])[1] == kind]
        ys = [b for r, _, b in pts if layer_position(r["layer"])[1] == kind]
        left.scatter(xs, ys, s=14, color=colors[kind], label=kind, alpha=0.85)
    lo = min(min(a, b) for _, a, b in pts)
    hi = max(max(a, b) for _, a, b in pts)
    left.plot([lo, hi], [lo, hi], "-", color="0.5", lw=1, label="no change")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("E_x after ITF")
    left.set_ylabel("E_x after AGA")
    left.set_title("per layer: E_x before / after AGA (below the line = AGA helps)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3, which="both")

    change = _per_kind([r for r, _, _ in pts],
                       lambda r: 100.0 * (_num(r, "E_x_aga") / _num(r, "E_x_itf") - 1.0))
    for i, (kind, (xs, ys)) in enumerate(change.items()):
        right.plot(xs, ys, "-", marker=MARKERS[i % len(MARKERS)], ms=4, color=colors[kind],
                   label=kind)
    right.axhline(0, color="0.5", lw=1)
    right.set_xlabel("decoder block")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("E_x change by AGA (%)")
    right.set_title("AGA's change of E_x per layer")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    _caption(fig, caption, "E_x = tr((W - Q) H (W - Q)^T) of each block of the compensated weight, "
             "summed over the layer's blocks.")
    return _save(fig, path)


def _column_blocks(perm, k: int, block_size: int) -> np.ndarray:
    """For every original column, the index of the quantization block it went to (0 = first)."""
    if perm is None:
        return np.arange(k) // block_size
    p = np.asarray(perm.tolist() if hasattr(perm, "tolist") else perm, dtype=np.int64)
    if p.size != k or not np.array_equal(np.sort(p), np.arange(k)):
        raise ValueError(f"a column order of {p.size} entries is not a permutation of 0..{k - 1}")
    pos = np.empty_like(p)
    pos[p] = np.arange(p.size)
    return pos // block_size


def plot_block_order(rows, path: Path, perms: Optional[Mapping[str, Any]] = None,
                     block_size: int = 128, caption: str = "") -> Optional[Path]:
    shift = _per_kind(rows, lambda r: (100.0 * _num(r, "mean_abs_shift") / r["shape"][-1]
                                       if _num(r, "mean_abs_shift") is not None and r.get("shape")
                                       else None))
    if not shift:
        log.info("no block-order statistics in the report: skipping %s", path.name)
        return None
    kinds = _kinds(rows)
    colors = _colors(kinds)
    heat_kinds = _heatmap_kinds(rows, perms)
    fig = Figure(figsize=(13, 9.5 if heat_kinds else 5.2))
    grid = fig.add_gridspec(2 if heat_kinds else 1, 2)
    ax = fig.add_subplot(grid[0, :])
    for i, kind in enumerate(kinds):
        if kind in shift:
            ax.plot(*shift[kind], "-", marker=MARKERS[i % len(MARKERS)], ms=4, color=colors[kind],
                    label=kind)
    # a uniformly random order moves a column by m/3 on average (E|i - j| for i, j uniform)
    ax.axhline(100 / 3, ls="--", color="0.3", lw=1, label="random order (1/3)")
    ax.axhline(0, ls=":", color="0.3", lw=1, label="natural order")
    frac = [v for r in rows if (v := _num(r, "frac_blocks_reordered")) is not None]
    span = (f"{100 * min(frac):.0f} % in every layer" if frac and min(frac) == max(frac)
            else f"{100 * min(frac):.0f}-{100 * max(frac):.0f} % per layer" if frac else "")
    ax.set_title("block order: mean distance of a column from its natural position"
                 + (f" (blocks not equal to a natural block: {span})" if span else ""))
    ax.set_ylabel("mean |column shift| (% of in_features)")
    ax.set_xlabel("decoder block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    for j, kind in enumerate(heat_kinds):
        ax = fig.add_subplot(grid[1, j])
        layer_rows = sorted(((layer_position(r["layer"])[0], r) for r in rows
                             if layer_position(r["layer"])[1] == kind and r["layer"] in perms),
                            key=lambda t: t[0])
        k = int(layer_rows[0][1]["shape"][-1])
        image = np.stack([_column_blocks(perms[r["layer"]], k, block_size) for _, r in layer_rows])
        n_blocks = int(image.max()) + 1
        im = ax.imshow(image, aspect="auto", interpolation="nearest",
                       cmap=colormaps["viridis"].resampled(n_blocks), vmin=-0.5,
                       vmax=n_blocks - 0.5,
                       extent=(0, k, layer_rows[-1][0] + 0.5, layer_rows[0][0] - 0.5))
        ax.set_title(f"{kind}: quantization block of each input column")
        ax.set_xlabel(f"input column (natural order, {k} columns)")
        ax.set_ylabel("decoder block")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        cbar = fig.colorbar(im, ax=ax, ticks=range(n_blocks))
        cbar.set_label(f"quantized in block (0 = first; {block_size} columns each)")
    _caption(fig, caption, "Heat maps: the natural order is a left-to-right staircase; SSR "
             "groups columns by similarity instead." if heat_kinds else "")
    return _save(fig, path)


def _heatmap_kinds(rows, perms) -> List[str]:
    """Up to two layer kinds with permutations for every layer (the widest input first); stacked
    MoE experts (one permutation per expert) are not drawn."""
    if not perms:
        return []
    kinds = []
    for kind in _kinds(rows):
        of_kind = [r for r in rows if layer_position(r["layer"])[1] == kind]
        if of_kind and all(r["layer"] in perms and len(r.get("shape") or ()) == 2 for r in of_kind):
            kinds.append((int(of_kind[0]["shape"][-1]), kind))
    # the first kind (e.g. q_proj) and the widest-input kind (e.g. down_proj)
    if not kinds:
        return []
    first = kinds[0][1]
    widest = max(kinds, key=lambda t: t[0])[1]
    return [first] if widest == first else [first, widest]


def read_ablation(path) -> List[Dict[str, Any]]:
    """Ablation rows (name, ppl, bits, bits_trit, ...) from ``benchmarks/ablation.py --json``
    output, or from the table between the ablation markers of a markdown file (docs/results.md)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list) or not all(isinstance(r, dict) and {"name", "ppl", "bits"}
                                                 <= set(r) for r in rows):
            raise ValueError(f"{path} is not an ablation JSON (a list of rows with name, ppl, "
                             "bits)")
        return rows
    if ABLATION_START not in text or ABLATION_END not in text:
        raise ValueError(f"{path} has no ablation table (between {ABLATION_START} and "
                         f"{ABLATION_END}); pass benchmarks/ablation.py --json output instead")
    block = text.split(ABLATION_START, 1)[1].split(ABLATION_END, 1)[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] in ("configuration", "") or set(cells[1]) <= set("-:"):
            continue
        try:
            rows.append({"name": cells[0], "ppl": float(cells[1].replace(",", "")),
                         "bits": float(cells[2]), "bits_trit": float(cells[3])})
        except ValueError:
            continue
    if not rows:
        raise ValueError(f"the ablation table of {path} has no rows")
    return rows


def plot_ablation(ablation: Sequence[Dict[str, Any]], path: Path, caption: str = ""
                  ) -> Optional[Path]:
    rows = [r for r in ablation if math.isfinite(float(r["ppl"])) and float(r["ppl"]) > 0]
    if not rows:
        return None
    fp = [r for r in rows if float(r["bits"]) >= 16]
    quant = [r for r in rows if float(r["bits"]) < 16]
    zoom = _zoom_set(quant)
    fig = Figure(figsize=(15, 6))
    full = fig.add_axes((0.05, 0.13, 0.3, 0.78))
    axes = [full] + ([fig.add_axes((0.41, 0.13, 0.2, 0.78))] if zoom else [])
    cmap = colormaps["tab20"]
    xs = _dodge([float(r["bits"]) for r in quant], [float(r["ppl"]) for r in quant])
    for ax in axes:
        for i, (r, x) in enumerate(zip(quant, xs)):
            if ax is not full and i not in zoom:
                continue
            ax.scatter(x, float(r["ppl"]), s=70, marker=MARKERS[i % len(MARKERS)],
                       color=cmap(i % cmap.N), edgecolor="black", linewidth=0.5, zorder=3,
                       label=f"{r['name']}: {float(r['ppl']):,.1f} at {float(r['bits']):.2f} bits")
        if ax is full:
            for r in fp:
                ax.axhline(float(r["ppl"]), ls="--", color="0.3", lw=1.2,
                           label=f"{r['name']}: {float(r['ppl']):,.1f} at "
                                 f"{float(r['bits']):.0f} bits")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.set_xlabel("bits per weight, all-in")
    full.set_ylabel("perplexity (log scale)")
    full.set_title("perplexity vs bits per weight")
    lo, hi = min(xs, default=2.0), max(xs, default=2.0)
    full.set_xlim(lo - 0.1, hi + 0.1)
    if zoom:
        zx = [xs[i] for i in zoom]
        zy = [float(quant[i]["ppl"]) for i in zoom]
        axes[1].set_xlim(min(zx) - 2 * DODGE, max(zx) + 2 * DODGE)
        axes[1].set_ylim(min(zy) / 1.3, max(zy) * 1.3)
        axes[1].set_title("zoom: the best ternary points")
        full.indicate_inset((min(zx) - 2 * DODGE, min(zy) / 1.3, max(zx) - min(zx) + 4 * DODGE,
                             max(zy) * 1.3 - min(zy) / 1.3), edgecolor="0.4")
        plain = FuncFormatter(lambda v, _: f"{v:,.0f}")
        axes[1].yaxis.set_major_formatter(plain)
        axes[1].yaxis.set_minor_formatter(plain)
    handles, labels = full.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.63 if zoom else 0.37, 0.5),
               fontsize=8, frameon=False)
    _caption(fig, caption, "Bits: codes (2-bit packed) + 16-bit scales + permutation indices. "
             f"Points with the same bits/weight are spread sideways by {DODGE} bit so that they do "
             "not hide each other; the legend has the exact values", tight=False)
    return _save(fig, path)


def _zoom_set(quant) -> List[int]:
    """Indices of the low-bit points within 10x of the best low-bit perplexity (the cluster that
    the full view squeezes), when there are at least two."""
    low = [i for i, r in enumerate(quant) if float(r["bits"]) < 2.5]
    if not low:
        return []
    best = min(float(quant[i]["ppl"]) for i in low)
    zoom = [i for i in low if float(quant[i]["ppl"]) <= 10 * best]
    return zoom if len(zoom) >= 2 else []


DODGE = 0.006  # bits: sideways spread of ablation points that share a bits/weight value


def _dodge(xs: List[float], ys: List[float]) -> List[float]:
    """x positions with points of equal x spread symmetrically (ordered by y, top first)."""
    out = list(xs)
    for x in set(xs):
        same = sorted((i for i, v in enumerate(xs) if v == x), key=lambda i: -ys[i])
        for j, i in enumerate(same):
            out[i] = x + DODGE * (j - (len(same) - 1) / 2)
    return out


def _caption(fig: Figure, caption: str, note: str, tight: bool = True) -> None:
    """Settings and notes in small print under the axes; ``tight`` lays out subplot grids."""
    text = ". ".join(t.rstrip(". ") for t in (caption, note) if t) + "."
    if text != ".":
        fig.text(0.01, 0.005, text, fontsize=8, color="0.25", ha="left", va="bottom", wrap=True)
    if tight:
        fig.tight_layout(rect=(0, 0.04, 1, 1))


def write_plots(rows: Sequence[Dict[str, Any]], out_dir, ablation: Optional[Sequence[dict]] = None,
                *, perms: Optional[Mapping[str, Any]] = None, block_size: int = 128,
                caption: str = "", ablation_caption: str = "") -> List[Path]:
    """Write the report's PNGs into ``out_dir`` (created); returns the paths written.

    ``rows``: ``QuantStore.report()`` rows (or a report JSON's "layers"); ``ablation``: rows of
    :func:`read_ablation`; ``perms``: weight FQN -> column permutation (None = natural order) for
    the block-order heat maps, whose blocks hold ``block_size`` columns; ``caption``: the settings
    that produced the rows, printed under their figures (``ablation_caption`` under the
    ablation's). A plot whose data is missing from the rows is skipped (logged)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_itf_convergence(rows, out / "itf_convergence.png", caption),
               plot_aga_error(rows, out / "aga_error.png", caption),
               plot_block_order(rows, out / "block_order.png", perms, block_size, caption)]
    if ablation:
        written.append(plot_ablation(ablation, out / "ablation_ppl_bits.png", ablation_caption))
    return [p for p in written if p is not None]
