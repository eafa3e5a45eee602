"""The model's other tensors (embeddings, norms, LM head, biases, rotary buffers, ...).

Saving takes them from the lowered graph, leaving out what lowering made from the store
(packed codes, scales, permutations, GPTQ weights) and undoing FoldPermutations' row order on
the biases of folded Linears, so the checkpoint holds the model's own tensors; tied tensors
are stored once. Loading builds a skeleton whose quantized Linear weights stay on the meta
device and installs the saved tensors into it, checking names and shapes against the model.
"""
from __future__ import annotations

import copy
import itertools
import logging
from typing import Dict, Optional, Set, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..capture import LINEAR_OP, WEIGHT_FQN
from ..experts import experts_parts, is_grouped_mm
from ..lowering.lower import (GATHER, LOWERED_BUFFERS, OUTPUT_PERM, TERNARY_EXPERTS_OP, TERNARY_OP,
                              lowered_buffer)
from ..store import QuantStore
from .errors import CheckpointError

log = logging.getLogger(__name__)

Shape = Tuple[int, ...]


def graph_model_tensors(gm: fx.GraphModule, store: QuantStore
                        ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], Dict[str, torch.dtype]]:
    """(tensors by name, tied aliases {alias: stored name}, quantized weights' dtypes by FQN)."""
    owned, row_perms, weight_dtypes = _lowering_products(gm, store)
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    views: Dict[tuple, str] = {}
    storages: Set[int] = set()
    named = itertools.chain(gm.named_parameters(remove_duplicate=False),
                            gm.named_buffers(remove_duplicate=False))
    for name, t in sorted(named, key=lambda item: item[0]):
        if name in owned:
            continue
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:  # the same tensor under a second name (tied): stored once
            aliases[name] = views[view]
            continue
        views[view] = name
        value = t.detach().cpu()
        if name in row_perms:  # bias rows permuted by FoldPermutations: back to the model's order
            value = _unpermute_rows(value, row_perms[name].cpu())
        elif view[0] in storages:  # overlaps another stored tensor: safetensors wants its own copy
            value = value.clone()
        storages.add(view[0])
        tensors[name] = value.contiguous()
    return tensors, aliases, weight_dtypes


def _lowering_products(gm: fx.GraphModule, store: QuantStore):
    """Names that lowering derived from the store, folded biases' row orders, weight dtypes."""
    owned = set(store.layers)
    for fqn in store.layers:
        owned.update(lowered_buffer(fqn, kind) for kind in LOWERED_BUFFERS)
    row_perms: Dict[str, torch.Tensor] = {}
    weight_dtypes: Dict[str, torch.dtype] = {}
    for node in gm.graph.nodes:
        if node.meta.get(GATHER) and isinstance(node.args[2], fx.Node):
            owned.add(node.args[2].target)
        fqn = node.meta.get(WEIGHT_FQN)
        if fqn not in store or not (node.target in (TERNARY_OP, LINEAR_OP, TERNARY_EXPERTS_OP)
                                    or is_grouped_mm(node)):
            continue
        if node.target is TERNARY_EXPERTS_OP:  # (x, offs, packed, alpha, mu, perm, block_size)
            owned.update(a.target for a in node.args[2:6] if isinstance(a, fx.Node))
            val = node.meta.get("val")
            weight_dtypes[fqn] = val.dtype if val is not None else torch.float32
            continue
        if is_grouped_mm(node):  # experts quantized by a method that is not lowered
            weight_dtypes[fqn] = _attr(gm, experts_parts(node)[1].target).dtype
            continue
        if node.target is TERNARY_OP:
            x, packed, alpha, mu, bias, perm = node.args[:6]
            owned.update(a.target for a in (packed, alpha, mu, perm) if isinstance(a, fx.Node))
            val = node.meta.get("val")
            weight_dtypes[fqn] = val.dtype if val is not None else torch.float32
        else:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            weight_dtypes[fqn] = _attr(gm, node.args[1].target).dtype
        if isinstance(bias, fx.Node) and node.meta.get(OUTPUT_PERM) is not None:
            row_perms[bias.target] = node.meta[OUTPUT_PERM]
    absent = sorted(set(store.layers) - set(weight_dtypes))
    if absent:
        raise CheckpointError(f"quantized layers not used by the model's graph: {absent[:3]}")
    return owned, row_perms, weight_dtypes


def _unpermute_rows(value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(value)
    out[rows] = value  # the graph holds value = original[rows]
    return out


def meta_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are on the meta device (no
    data is copied; the user's module is untouched)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in module.buffers()})
    return copy.deepcopy(module, memo)


def install_tensors(skeleton: nn.Module, tensors: Dict[str, torch.Tensor], aliases: Dict[str, str],
                    quantized: Dict[str, Tuple[Shape, torch.dtype]], device: torch.device) -> None:
    """Put the saved tensors into ``skeleton`` (tied names share one tensor) and a meta tensor
    of the recorded shape and dtype in place of each quantized weight."""
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    buffers = dict(skeleton.named_buffers(remove_duplicate=False))
    aliases = {**_skeleton_ties(params, buffers, set(tensors) | set(aliases)), **aliases}
    stored = set(tensors) | set(aliases)
    _check_names(skeleton, set(params) | set(buffers), stored, quantized, params)
    for name in sorted(stored):
        have = params[name] if name in params else buffers[name]
        saved = tensors[aliases.get(name, name)]
        if tuple(have.shape) != tuple(saved.shape):
            raise CheckpointError(f"shape mismatch: {name} is {tuple(saved.shape)} in the checkpoint "
                                  f"but {tuple(have.shape)} in {type(skeleton).__name__}")
    for fqn, (shape, _) in quantized.items():
        if tuple(params[fqn].shape) != tuple(shape):
            raise CheckpointError(f"shape mismatch: quantized layer {fqn} is {tuple(shape)} in the "
                                  f"checkpoint but {tuple(params[fqn].shape)} in {type(skeleton).__name__}")
    made: Dict[Tuple[str, bool], torch.Tensor] = {}
    for name in sorted(stored):
        source, is_param = aliases.get(name, name), name in params
        if (source, is_param) not in made:
            value = tensors[source].to(device)
            made[source, is_param] = nn.Parameter(value, requires_grad=False) if is_param else value
        owner, attr = _owner(skeleton, name)
        (owner._parameters if is_param else owner._buffers)[attr] = made[source, is_param]
    for fqn, (shape, dtype) in quantized.items():
        owner, attr = _owner(skeleton, fqn)
        owner._parameters[attr] = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"),
                                               requires_grad=False)


def _skeleton_ties(params, buffers, stored: Set[str]) -> Dict[str, str]:
    """Names the skeleton ties to a stored name (one tensor under several names): torch.export
    keeps only one name of a tied weight (SmolLM2's lm_head / embed_tokens), so only that one
    is saved; the others get the same tensor."""
    groups: Dict[int, list] = {}
    for name, t in itertools.chain(params.items(), buffers.items()):
        groups.setdefault(id(t), []).append(name)
    ties = {}
    for names in groups.values():
        source = next((n for n in sorted(names) if n in stored), None)
        if source is not None:
            ties.update({n: source for n in names if n not in stored})
    return ties


def _check_names(skeleton, expected: Set[str], stored: Set[str], quantized, params) -> None:
    what = type(skeleton).__name__
    not_weights = sorted(fqn for fqn in quantized if fqn not in params)
    if not_weights:
        raise CheckpointError(f"quantized layer {not_weights[0]} is not a parameter of {what} "
                              f"({len(not_weights)} such layers): the checkpoint is for another model")
    missing = sorted(expected - stored - set(quantized))
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]}: {what} has {len(missing)} tensor(s) "
                              f"the checkpoint lacks ({', '.join(missing[:5])})")
    extra = sorted(stored - expected)
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]}: the checkpoint has {len(extra)} "
                              f"tensor(s) {what} does not ({', '.join(extra[:5])})")


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, attr = _owner(gm, target)
    return getattr(owner, attr)


def _owner(module: nn.Module, fqn: str):
    prefix, _, attr = fqn.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), attr


def skeleton_device(model: Optional[nn.Module], device) -> torch.device:
    """``device`` if given, else where ``model``'s real tensors are, else the CPU."""
    if device is not None:
        return torch.device(device)
    if isinstance(model, nn.Module):
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")
