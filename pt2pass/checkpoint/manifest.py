"""``pt2pass.json``: what a checkpoint holds and how it was made.

Written with sorted keys and without timings, so that the same store gives the same bytes (two
runs with the same seed and data give identical checkpoints). Layout::

    format        {"checkpoint": CHECKPOINT_FORMAT_VERSION, "packed_ternary": lowering FORMAT_VERSION}
    pt2pass_version, source, calibration        (the last two as given to ``save``)
    quantization  the store's settings (TernaryConfig, seqlen, calibration sequences, ...)
    model         {"class", "causal_lm", "attn_implementation", "config": HF config dict or null}
    tensors       {"file", "bytes", "sha256", "tied": {alias: stored name}}
    layers        {weight FQN: method, out/in_features, block_size, dtypes, codes packing, perm}
    report        the store's per-layer report (quantizer statistics)
"""
from __future__ import annotations

import importlib.metadata
import json
import math
from typing import Any, Dict, List

import torch

from ..lowering.format import FORMAT_VERSION
from ..store import QuantStore
from .errors import CheckpointError

CHECKPOINT_FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "pt2pass.json"
TIMING_STATS = ("seconds",)     # differ between identical runs: left out of the checkpoint
REPORT_KEYS = ("layer", "shape", "method")  # the report's own columns; the rest are stats
REQUIRED = ("format", "model", "tensors", "layers", "report", "quantization")


def pt2pass_version() -> str:
    try:
        return importlib.metadata.version("pt2pass")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def json_safe(value: Any) -> Any:
    """Plain JSON values: tensors become lists, dtypes strings, non-finite floats "nan"/"inf"."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)


def report_rows(store: QuantStore) -> List[dict]:
    rows = json_safe(store.report())
    return [{k: v for k, v in row.items() if k not in TIMING_STATS} for row in rows]


def model_section(qm) -> dict:
    config = qm.model_config
    to_dict = getattr(config, "to_dict", None)
    skeleton = getattr(qm, "skeleton", None)
    architectures = getattr(config, "architectures", None) or [
        type(skeleton).__name__ if skeleton is not None else None]
    return {"class": architectures[0], "causal_lm": bool(qm.causal_lm),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "config": json_safe(to_dict()) if callable(to_dict) else None}


def build_manifest(qm, layers: Dict[str, dict], tied: Dict[str, str], n_bytes: int, sha256: str,
                   *, source=None, calibration=None) -> dict:
    return {
        "format": {"checkpoint": CHECKPOINT_FORMAT_VERSION, "packed_ternary": FORMAT_VERSION},
        "pt2pass_version": pt2pass_version(),
        "source": json_safe(source),
        "calibration": json_safe(calibration),
        "quantization": json_safe(qm.store.config),
        "model": model_section(qm),
        "tensors": {"file": TENSORS_FILE, "bytes": n_bytes, "sha256": sha256,
                    "tied": dict(sorted(tied.items()))},
        "layers": layers,
        "report": report_rows(qm.store),
    }


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()


def parse_manifest(data: bytes) -> dict:
    """The manifest, checked for the fields ``load`` reads and a supported format version."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{MANIFEST_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{MANIFEST_FILE} must hold a JSON object")
    fmt = manifest.get("format")
    version = fmt.get("checkpoint") if isinstance(fmt, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{MANIFEST_FILE} has no valid format.checkpoint version (got {version!r})")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version} is newer than this pt2pass "
                              f"({pt2pass_version()}) supports ({CHECKPOINT_FORMAT_VERSION}); "
                              "upgrade pt2pass")
    missing = [k for k in REQUIRED if not isinstance(manifest.get(k), (dict, list))]
    if missing:
        raise CheckpointError(f"{MANIFEST_FILE} lacks the field(s) {', '.join(missing)}")
    return manifest


def layer_stats(manifest: dict) -> Dict[str, dict]:
    """Per-layer quantizer statistics, recovered from the report rows."""
    stats = {}
    for row in manifest["report"]:
        if not isinstance(row, dict) or "layer" not in row:
            raise CheckpointError(f"{MANIFEST_FILE}: a report row has no 'layer': {row!r}")
        stats[row["layer"]] = {k: v for k, v in row.items() if k not in REPORT_KEYS}
    return stats
