"""LowerTernaryLinear: aten.linear with a ternarized weight -> pt2pass::ternary_linear.

Before:  w = get_attr[model.layers.0.mlp.up_proj.weight];  y = aten.linear(x, w, b)
After:   p = get_attr[model.layers.0.mlp.up_proj.packed]   (int32 2-bit codes)
         a = get_attr[...alpha];  m = get_attr[...mu];  (perm = get_attr[...input_perm])
         y = pt2pass.ternary_linear(x, p, a, m, b, perm)

Results come from the store (keyed by weight FQN), so the pass applies to any graph of the model.
If an earlier pass already permuted the Linear's input (InsertPermutations / FoldPermutations set
``meta["pt2pass_input_permuted"]``) the op gets no ``perm``; otherwise an SSR permutation is
passed to the op, whose kernel gathers x; an explicit gather that feeds only this Linear is
fused back into the op the same way (a gather shared by q/k/v stays, computed once). Rows
permuted by FoldPermutations
(``meta["pt2pass_output_perm"]``) are applied to the packed rows, scales and bias. The
full-precision weight is removed from the module.
"""
from __future__ import annotations

import itertools
import logging
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from ..capture import LINEAR_OP, WEIGHT_FQN, require_captured
from ..experts import experts_parts, is_grouped_mm
from ..pass_manager import Pass, PassResult
from ..store import LayerQuant, QuantStore, store_of
from .format import pack_ternary
from . import ops  # noqa: F401  (registers torch.ops.pt2pass.ternary_linear)

log = logging.getLogger(__name__)

TERNARY_OP = torch.ops.pt2pass.ternary_linear.default
TERNARY_EXPERTS_OP = torch.ops.pt2pass.ternary_experts.default
INPUT_PERMUTED = "pt2pass_input_permuted"
OUTPUT_PERM = "pt2pass_output_perm"
GATHER = "pt2pass_gather"  # marks index_select nodes inserted by InsertPermutations
LOWERED_BUFFERS = ("packed", "alpha", "mu", "input_perm")  # registered by Insert/Lower per weight


def lowered_buffer(fqn: str, kind: str) -> str:
    """Dotted name of the ``kind`` buffer (one of LOWERED_BUFFERS) of the quantized weight ``fqn``:
    beside the weight, named ``kind`` for an nn.Linear's ``weight`` and ``<attr>_<kind>`` for any
    other parameter, so that two weights of one module (e.g. MultiheadAttention's q/k/v_proj_weight,
    used through F.linear) get buffers of their own."""
    prefix, _, attr = fqn.rpartition(".")
    name = kind if attr == "weight" else f"{attr}_{kind}"
    return f"{prefix}.{name}" if prefix else name


def register_lowered_buffer(gm: fx.GraphModule, fqn: str, kind: str, value: torch.Tensor) -> str:
    """Register ``value`` as the ``kind`` buffer of ``fqn`` (see lowered_buffer); returns its name."""
    target = lowered_buffer(fqn, kind)
    prefix, _, name = target.rpartition(".")
    (gm.get_submodule(prefix) if prefix else gm).register_buffer(name, value)
    return target


class LowerTernaryLinear(Pass):
    def __init__(self, store: Optional[QuantStore] = None, *, allow_empty: bool = False):
        self.store = store
        self.allow_empty = allow_empty
        self.lowered = 0

    def requires(self, gm: fx.GraphModule) -> None:
        require_captured(gm, self.name)
        # run before any quantizing pass, it would lower nothing and look like success
        if not self.allow_empty and not len(self._store(gm)):
            raise ValueError(f"{self.name}: no Linear has been quantized yet (the store is empty); run "
                             "a quantizing pass (SequentialTernarize or TernarizeWeights) before it")

    def _store(self, gm: fx.GraphModule) -> QuantStore:
        return self.store if self.store is not None else store_of(gm)

    def _targets(self, gm: fx.GraphModule):
        store = self._store(gm)
        return [n for n in gm.graph.nodes if (n.target is LINEAR_OP or is_grouped_mm(n))
                and n.meta.get(WEIGHT_FQN) in store and store[n.meta[WEIGHT_FQN]].is_ternary]

    def call(self, gm: fx.GraphModule) -> PassResult:
        store = self._store(gm)
        targets = self._targets(gm)
        for node in targets:
            lower = self._lower if node.target is LINEAR_OP else self._lower_experts
            lower(gm, node, store[node.meta[WEIGHT_FQN]])
        gm.graph.eliminate_dead_code()
        _drop_unused_attributes(gm)
        self.lowered = len(targets)
        log.info("lowered %d Linear / experts nodes to pt2pass.ternary_linear / ternary_experts", len(targets))
        return PassResult(gm, modified=bool(targets))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = self._targets(gm)
        if left:
            raise AssertionError(f"{len(left)} ternarized Linear nodes were not lowered: {left[:3]}")

    def _lower(self, gm: fx.GraphModule, node: fx.Node, layer: LayerQuant) -> None:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        w = fetch_attr(gm, weight.target)
        if tuple(w.shape) != layer.shape:
            raise ValueError(f"{layer.fqn}: graph weight {tuple(w.shape)} does not match the "
                             f"quantized layer {layer.shape}")
        # the store's packed codes themselves (no copy): every graph lowered from it shares them
        packed = layer.packed if layer.packed is not None else pack_ternary(layer.T)
        alpha, mu = layer.alpha, layer.mu
        rows = node.meta.get(OUTPUT_PERM)
        if rows is not None:  # packing is per row: permuting rows permutes packed rows
            packed, alpha, mu = packed[rows], alpha[rows], mu[rows]
        names = {"packed": packed, "alpha": alpha, "mu": mu}
        needs_perm = layer.perm is not None and not node.meta.get(INPUT_PERMUTED, False)
        if layer.perm is not None and x.meta.get(GATHER) and len(x.users) == 1:
            x, needs_perm = x.args[0], True  # fuse the explicit gather into the kernel
        if needs_perm:
            names["input_perm"] = layer.perm.to(torch.int32)  # stored as int32 (see sizes.py)
        _call_with_buffers(gm, node, layer.fqn, w, names, TERNARY_OP, lambda a: (
            x, a["packed"], a["alpha"], a["mu"], bias, a.get("input_perm"), layer.block_size))

    def _lower_experts(self, gm: fx.GraphModule, node: fx.Node, layer: LayerQuant) -> None:
        """grouped_mm(x, transpose(W), offs) -> pt2pass.ternary_experts(x, offs, packed, ...);
        the stacked experts' buffers are registered beside W like a Linear's."""
        x, weight, offs = experts_parts(node)
        w = fetch_attr(gm, weight.target)
        if tuple(w.shape) != layer.shape:
            raise ValueError(f"{layer.fqn}: graph experts weight {tuple(w.shape)} does not match the "
                             f"quantized experts {layer.shape}")
        names = {"packed": layer.packed, "alpha": layer.alpha, "mu": layer.mu}
        if layer.perm is not None:
            names["input_perm"] = layer.perm.to(torch.int32)
        _call_with_buffers(gm, node, layer.fqn, w, names, TERNARY_EXPERTS_OP, lambda a: (
            x, offs, a["packed"], a["alpha"], a["mu"], a.get("input_perm"), layer.block_size))


def _call_with_buffers(gm: fx.GraphModule, node: fx.Node, fqn: str, weight: torch.Tensor, names: dict,
                       op, args) -> None:
    """Register ``names`` (kind -> tensor) as the buffers of weight ``fqn`` on its device, and
    put ``op(*args(get_attr nodes by kind))`` in ``node``'s place."""
    device = buffer_device(gm, weight)
    targets = {k: register_lowered_buffer(gm, fqn, k, v.to(device).contiguous()) for k, v in names.items()}
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(op, args({k: gm.graph.get_attr(t) for k, t in targets.items()}))
    _replace(gm, node, new)


def _replace(gm: fx.GraphModule, node: fx.Node, new: fx.Node) -> None:
    """``new`` takes ``node``'s place, users and metadata (its value's shape included)."""
    new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    if "val" in node.meta:
        new.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def buffer_device(gm: fx.GraphModule, weight: torch.Tensor) -> torch.device:
    """Where buffers derived from ``weight`` go: its device, or, for a weight on the meta device
    (a model rebuilt from a checkpoint never materialises the replaced weights), the device of
    the graph's real tensors."""
    if weight.device.type != "meta":
        return weight.device
    for t in itertools.chain(gm.parameters(), gm.buffers()):
        if t.device.type != "meta":
            return t.device
    raise ValueError("every tensor of the graph is on the meta device: no device to lower onto")


def fetch_attr(gm: nn.Module, target: str) -> torch.Tensor:
    """The tensor a get_attr node with this (dotted) target reads."""
    prefix, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(prefix) if prefix else gm, attr)


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters no graph node reads any more (the replaced full-precision weights)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()):
        if name not in used:
            prefix, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(prefix) if prefix else gm, attr)
