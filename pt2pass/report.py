"""The per-layer quantization report as a text table and as JSON.

A row is what ``QuantStore.report()`` returns for one Linear: ``layer`` (weight FQN), ``shape``
(out, in), ``method`` and the quantizer's statistics (pt2pass/quant/gptq.py lists them): E_w /
E_x after ITF and after AGA (block errors of the compensated weight, summed over blocks),
E_w / E_x of the whole layer against the original weight, ITF iterations (and the per-iteration
E_w history), SSR block-order statistics and seconds. Baselines have fewer keys; missing values
show as "-".
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import textwrap
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .checkpoint.files import apply_umask

REPORT_VERSION = 1
LAYERS_KEY = "layers"
CHECKPOINT_META = "pt2pass.json"
CHECKPOINT_REPORT = "report.json"
CHECKPOINT_ROWS_KEY = "report"

_MISSING = "-"


def short_name(fqn: str) -> str:
    """The FQN without the ".weight" suffix (every row is a weight)."""
    return fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn


def _num(row: dict, key: str) -> Optional[float]:
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _sci(v: Optional[float]) -> str:
    return _MISSING if v is None else f"{v:.4g}"


def _aga_change(row: dict) -> str:
    before, after = _num(row, "E_x_itf"), _num(row, "E_x_aga")
    if before is None or after is None or before <= 0:
        return _MISSING
    return f"{100.0 * (after / before - 1.0):+.1f}%"


def _iters(row: dict) -> str:
    mean, top = _num(row, "itf_iters_mean"), _num(row, "itf_iters_max")
    return _MISSING if mean is None else f"{mean:.1f}/{int(top or 0)}"


def _reordered(row: dict) -> str:
    v = _num(row, "frac_blocks_reordered")
    return _MISSING if v is None else f"{100.0 * v:.0f}%"


def _shift(row: dict) -> str:
    v = _num(row, "mean_abs_shift")
    return _MISSING if v is None else f"{v:.1f}"


def _seconds(row: dict) -> str:
    v = _num(row, "seconds")
    return _MISSING if v is None else f"{v:.2f}"


def _shape(row: dict) -> str:
    shape = row.get("shape")
    return "x".join(str(int(d)) for d in shape) if shape else _MISSING


# (header, row -> cell text), after the layer name
COLUMNS = [
    ("shape", lambda r: _shape(r)),
    ("E_w ITF", lambda r: _sci(_num(r, "E_w_itf"))),
    ("E_w AGA", lambda r: _sci(_num(r, "E_w_aga"))),
    ("E_x ITF", lambda r: _sci(_num(r, "E_x_itf"))),
    ("E_x AGA", lambda r: _sci(_num(r, "E_x_aga"))),
    ("AGA dE_x", _aga_change),
    ("layer E_w", lambda r: _sci(_num(r, "E_w"))),
    ("layer E_x", lambda r: _sci(_num(r, "E_x"))),
    ("ITF it", _iters),
    ("reord", _reordered),
    ("shift", _shift),
    ("time s", _seconds),
]
LEGEND = ("E_w = ||W - Q||^2, E_x = tr((W - Q) H (W - Q)^T); ITF/AGA columns: block errors of the "
          "compensated weight summed over blocks, after ITF and after AGA; AGA dE_x: change of E_x "
          "by AGA; layer E_w / E_x: the final layer against the original W; ITF it: mean/max iterations "
          "per block; reord: blocks whose column set differs from the natural block; shift: mean "
          "|position shift| of the columns (SSR order).")


def format_layer_table(rows: Sequence[Dict[str, Any]], legend: bool = True) -> str:
    """A fixed-width text table with one line per quantized Linear and a totals line."""
    if not rows:
        return "(no quantized layers)"
    names = [short_name(str(r.get("layer", "?"))) for r in rows]
    cells = [[fn(r) for _, fn in COLUMNS] for r in rows]
    total = _totals(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells + [total])) for i, (h, _) in
              enumerate(COLUMNS)]
    name_w = max(len("layer"), *(len(n) for n in names))

    def line(name: str, values: List[str]) -> str:
        return "  ".join([name.ljust(name_w)] + [v.rjust(w) for v, w in zip(values, widths)])

    out = [line("layer", [h for h, _ in COLUMNS])]
    out.append("-" * len(out[0]))
    out += [line(n, c) for n, c in zip(names, cells)]
    out.append("-" * len(out[0]))
    out.append(line(f"total ({len(rows)} layers)", total))
    if legend:
        out += textwrap.wrap(LEGEND, width=max(80, min(len(out[0]), 110)))
    return "\n".join(out)


def _totals(rows) -> List[str]:
    def total(key):
        values = [_num(r, key) for r in rows]
        return None if all(v is None for v in values) else sum(v for v in values if v is not None)

    summed = {k: total(k) for k in ("E_w_itf", "E_w_aga", "E_x_itf", "E_x_aga", "E_w", "E_x",
                                     "seconds")}
    return [_MISSING, _sci(summed["E_w_itf"]), _sci(summed["E_w_aga"]), _sci(summed["E_x_itf"]),
            _sci(summed["E_x_aga"]), _aga_change(summed), _sci(summed["E_w"]),
            _sci(summed["E_x"]), _MISSING, _MISSING, _MISSING,
            _MISSING if summed["seconds"] is None else f"{summed['seconds']:.1f}"]


def json_safe(value: Any) -> Any:
    """``value`` with tensors, numpy values, paths, dataclasses and tuples turned into JSON types.
    Non-finite floats become the strings "nan", "inf", "-inf" (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return json_safe(asdict(value))
    if hasattr(value, "tolist"):  # torch / numpy tensors and scalars
        return json_safe(value.tolist())
    return str(value)  # dtypes, devices and other small objects


def write_report_json(rows: Sequence[Dict[str, Any]], path, extra: Optional[Dict[str, Any]] = None
                      ) -> Path:
    """Write ``{"version", "layers": rows, **extra}`` to ``path`` atomically (a temporary file in
    the same folder, then renamed, so a reader never sees half a report). Returns the path."""
    extra = dict(extra or {})
    clash = {"version", LAYERS_KEY} & set(extra)
    if clash:
        raise ValueError(f"extra must not contain the reserved keys {sorted(clash)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json_safe({"version": REPORT_VERSION, LAYERS_KEY: list(rows), **extra})
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")
        apply_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_report(path) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """(rows, other top-level keys) of a report JSON, a checkpoint's pt2pass.json, or a checkpoint
    folder (its report.json if present, else the report inside pt2pass.json)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / CHECKPOINT_REPORT, path / CHECKPOINT_META]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(f"{path} is a folder without {CHECKPOINT_REPORT} or "
                                    f"{CHECKPOINT_META}: not a pt2pass checkpoint")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"report {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(doc, list):  # a bare list of rows
        doc = {LAYERS_KEY: doc}
    if not isinstance(doc, dict):
        raise ValueError(f"{path} holds no per-layer report")
    # report.json keeps the rows under "layers"; a checkpoint's pt2pass.json under "report"
    # (its "layers" describe the stored tensors)
    key = CHECKPOINT_ROWS_KEY if path.name == CHECKPOINT_META else LAYERS_KEY
    rows = doc.get(key)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "layer" in r for r in rows):
        raise ValueError(f"{path} holds no per-layer report (expected a {key!r} list of rows "
                         "with a 'layer' key)")
    for i, row in enumerate(rows):
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"{path}: row {i} is not a pt2pass report row: {problem}")
    if not isinstance(doc.get("config", {}), dict):
        raise ValueError(f"{path}: 'config' must be an object, got {type(doc['config']).__name__}")
    return rows, {k: v for k, v in doc.items() if k != key}


def _row_problem(row: Dict[str, Any]) -> str:
    """Why a row read from a file cannot be tabulated or plotted ('' if it can)."""
    number = (int, float)
    if not isinstance(row["layer"], str):
        return f"'layer' must be a string, got {row['layer']!r}"
    shape = row.get("shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) in (2, 3)
                                  and all(isinstance(d, int) and d > 0 for d in shape)):
        return f"'shape' must be [out_features, in_features] or [experts, out, in], got {shape!r}"
    for k, v in row.items():
        if k.startswith("E_") and not (v is None or isinstance(v, number) or (
                isinstance(v, list) and all(isinstance(x, number) for x in v))):
            return f"{k!r} must be a number (or a list of numbers), got {v!r}"
    return ""
