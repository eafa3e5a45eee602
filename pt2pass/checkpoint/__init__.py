"""Checkpoints of compiled models: ``pt2pass.save(qm, path)`` and ``pt2pass.load(path)``.

A checkpoint is a folder with ``model.safetensors`` (the quantization store, ternary codes at
5 trits per byte, plus the model's other tensors) and ``pt2pass.json`` (see ``manifest``). Loading
needs no calibration: the store is put back on a freshly captured graph of the model and the
lowering passes run again, which rebuilds exactly the saved model (see ``pt2pass.assemble``).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Dict, Optional

import safetensors.torch
import torch
from torch import nn

from ..assemble import assemble
from ..quantized_model import QuantizedModel
from ..store import QuantStore
from .errors import CheckpointError
from .files import (atomic_folder, check_folder, existing_file, file_digest, read_tensors,
                    write_bytes)
from .layers import decode_layer, encode_layer, layer_tensor_names, parse_dtype
from .manifest import (CHECKPOINT_FORMAT_VERSION, MANIFEST_FILE, TENSORS_FILE, build_manifest,
                       layer_stats, manifest_bytes, parse_manifest)
from .model_tensors import graph_model_tensors, install_tensors, meta_copy, skeleton_device

log = logging.getLogger(__name__)

__all__ = ["save", "load", "CheckpointError", "CHECKPOINT_FORMAT_VERSION", "MANIFEST_FILE",
           "TENSORS_FILE"]


def save(qm: QuantizedModel, path, *, source=None, calibration=None) -> Path:
    """Write ``qm`` to the folder ``path`` (created, or an earlier checkpoint replaced atomically).

    ``source``: what the model was made from (e.g. a hub id or file path), ``calibration``: a
    description of the calibration data; both JSON-like, recorded in ``pt2pass.json``.
    """
    if not isinstance(qm, QuantizedModel):
        raise TypeError(f"pt2pass.save takes the QuantizedModel that pt2pass.compile or pt2pass.load "
                        f"returns, got {type(qm).__name__}")
    tensors, tied, weight_dtypes = graph_model_tensors(qm.gm, qm.store)
    layers = {}
    for fqn in sorted(qm.store.layers):
        layer_tensors, layers[fqn] = encode_layer(qm.store[fqn], weight_dtypes[fqn])
        clash = sorted(layer_tensors.keys() & tensors.keys())
        if clash:
            raise CheckpointError(f"tensor name {clash[0]} is both a model tensor and a part of "
                                  f"quantized layer {fqn}")
        tensors.update(layer_tensors)
    path = Path(path)
    with atomic_folder(path) as staging:
        # One metadata key only: safetensors writes its metadata map in hash order.
        safetensors.torch.save_file(tensors, staging / TENSORS_FILE, metadata={"format": "pt"})
        size, digest = file_digest(staging / TENSORS_FILE)
        manifest = build_manifest(qm, layers, tied, size, digest, source=source,
                                  calibration=calibration)
        write_bytes(staging / MANIFEST_FILE, manifest_bytes(manifest))  # last: marks completion
    log.info("saved %d quantized layers and %d other tensors to %s (%.2f MB)", len(layers),
             len(tensors) - sum(len(layer_tensor_names(f, e)) for f, e in layers.items()), path,
             size / 1e6)
    return path


def load(path, model=None, *, device=None, example_inputs=None) -> QuantizedModel:
    """Rebuild the compiled model saved at ``path``, without calibration.

    ``model``: None (build the HF model from the saved config), a ``transformers``
    ``PretrainedConfig``, or a module of the same architecture (its weights are not used; the
    module is not modified). ``device``: where the model goes (default: ``model``'s device, else
    the CPU). ``example_inputs``: for capture, as in ``pt2pass.compile`` (needed for non-HF
    modules). Raises :class:`CheckpointError` naming the problem for a missing, damaged or
    too new checkpoint, or one that does not fit ``model``.
    """
    folder = check_folder(path)
    manifest = parse_manifest(existing_file(folder, MANIFEST_FILE).read_bytes())
    tensors = _read_tensors(folder, manifest)
    store = _read_store(manifest, tensors)
    tied = manifest["tensors"].get("tied") or {}
    if not isinstance(tied, dict):
        raise CheckpointError(f"{MANIFEST_FILE}: tensors.tied must map names to stored names")
    lost = sorted(set(tied.values()) - set(tensors))
    if lost:
        raise CheckpointError(f"missing tensor {lost[0]} (other names are tied to it)")
    clash = sorted(set(tied) & set(tensors))
    if clash:
        raise CheckpointError(f"{MANIFEST_FILE}: {clash[0]} is both stored and tied to "
                              f"{tied[clash[0]]}")
    skeleton = _skeleton(model, manifest)
    quantized = {fqn: (layer.shape, parse_dtype(manifest["layers"][fqn].get("weight_dtype"), fqn))
                 for fqn, layer in store.layers.items()}
    _warn_dtype_difference(model, {dtype for _, dtype in quantized.values()})
    device = skeleton_device(model, device)
    install_tensors(skeleton, tensors, tied, quantized, device)
    for layer in store.layers.values():  # lowering indexes them with graph tensors
        layer.to(device)
    qm = assemble(skeleton, store, example_inputs=example_inputs)
    log.info("loaded %s: %d quantized layers", folder, len(store))
    return qm


def _read_tensors(folder: Path, manifest: dict) -> Dict[str, torch.Tensor]:
    """The tensor file, checked against the size and SHA-256 that the manifest records."""
    path = existing_file(folder, TENSORS_FILE)
    size, digest = file_digest(path)
    record = manifest["tensors"]
    if size != record.get("bytes"):
        raise CheckpointError(f"{TENSORS_FILE} is {size} bytes but {MANIFEST_FILE} records "
                              f"{record.get('bytes')}: the file is truncated or was replaced")
    if digest != record.get("sha256"):
        raise CheckpointError(f"{TENSORS_FILE} does not match the SHA-256 recorded in "
                              f"{MANIFEST_FILE}: the file is corrupted or was modified")
    return read_tensors(path)


def _read_store(manifest: dict, tensors: Dict[str, torch.Tensor]) -> QuantStore:
    """The quantization store; its tensors are taken out of ``tensors``."""
    stats = layer_stats(manifest)
    store = QuantStore(config=dict(manifest["quantization"]))
    # The report keeps the store's order (the graph's): the loaded store lists layers alike.
    order = [f for f in stats if f in manifest["layers"]]
    order += sorted(set(manifest["layers"]) - set(order))
    for fqn in order:
        entry = manifest["layers"][fqn]
        if not isinstance(entry, dict):
            raise CheckpointError(f"{MANIFEST_FILE}: layer {fqn} must be a JSON object")
        names = layer_tensor_names(fqn, entry)
        absent = [n for n in names if n not in tensors]
        if absent:
            raise CheckpointError(f"missing tensor {absent[0]} of quantized layer {fqn}")
        parts = {n: tensors.pop(n) for n in names}
        store[fqn] = decode_layer(fqn, entry, parts, stats.get(fqn, {}))
    return store


def _skeleton(model, manifest: dict) -> nn.Module:
    """The module to capture: a meta-device copy of ``model``, or an HF model built on the meta
    device from a config (the saved one when ``model`` is None)."""
    saved = manifest["model"]
    _warn_config_differences(getattr(model, "config", model), saved.get("config"))
    if isinstance(model, nn.Module):
        return meta_copy(model)
    if model is None:
        if not saved.get("causal_lm") or not isinstance(saved.get("config"), dict):
            raise CheckpointError("the checkpoint was saved from a module that is not a Hugging Face "
                                  "causal LM: pass the module as load(path, model)")
        model = _config_from_dict(saved["config"])
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if not isinstance(model, PretrainedConfig):
        raise TypeError(f"model must be None, a transformers PretrainedConfig or an nn.Module, "
                        f"got {type(model).__name__}")
    # The attention kernel changes the logits' last bits: rebuild with the saved one unless the
    # given config chose its own.
    chosen = model._attn_implementation
    attn = chosen or saved.get("attn_implementation")
    pristine = copy.deepcopy(model)  # a failed from_config leaves its attn_implementation set
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(model, **({"attn_implementation": attn} if attn else {}))
        except (ImportError, ValueError) as exc:
            if chosen or not attn:
                raise
            # e.g. quantized where flash-attn is installed, loaded where it is not
            log.warning("the checkpoint was saved with attn_implementation %r, which cannot be built "
                        "here (%s: %s); using transformers' default (logits may differ in the last "
                        "bits)", attn, type(exc).__name__, str(exc).splitlines()[0][:200])
            return AutoModelForCausalLM.from_config(pristine)


# Config entries that do not change what the layers compute.
_BENIGN_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
                       "attn_implementation", "_attn_implementation", "architectures",
                       "output_attentions", "output_hidden_states", "return_dict"}


def _warn_config_differences(given, saved: Optional[dict]) -> None:
    """Log the scalar config entries in which the model given to ``load`` differs from the saved
    one (e.g. rms_norm_eps, hidden_act): the checkpoint's tensors then load into a model that
    computes something else, which shapes alone do not reveal."""
    if saved is None or given is None or not hasattr(given, "to_dict"):
        return
    current = given.to_dict()
    scalar = (str, int, float, bool, type(None))
    differ = sorted(k for k, v in saved.items() if k not in _BENIGN_CONFIG_KEYS and isinstance(v, scalar)
                    and k in current and current[k] != v)
    if differ:
        log.warning("the model given to load differs from the checkpoint's config in %s; the "
                    "outputs will differ from the saved model's", ", ".join(
                        f"{k} ({current[k]!r}, saved {saved[k]!r})" for k in differ))


def _warn_dtype_difference(model, saved: set) -> None:
    """The checkpoint loads in the dtype it was saved in, whatever the given module's dtype: say so
    when they differ (a bf16 module does not make a bf16 model from an fp32 checkpoint)."""
    if not isinstance(model, nn.Module):
        return
    given = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if given is not None and saved and given not in saved:
        log.warning("the module given to load is %s but the checkpoint was saved in %s and loads in it; "
                    "for another dtype, compile from a model in that dtype", given,
                    ", ".join(sorted(str(d) for d in saved)))


def _config_from_dict(config: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{MANIFEST_FILE}: model_type {model_type!r} is not known to this "
                              "transformers version")
    return CONFIG_MAPPING[model_type].from_dict(config)
