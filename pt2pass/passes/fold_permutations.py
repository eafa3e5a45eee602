"""FoldPermutations: push an input gather into the Linears that produce its input.

Before (SwiGLU MLP, down_proj reordered by SSR):
    g = linear(h, Wg);  u = linear(h, Wu);  a = mul(silu(g), u)
    y = linear(index_select(a, -1, p), Wd[:, p])
After:
    g = linear(h, Wg[p]);  u = linear(h, Wu[p]);  a = mul(silu(g), u)     (rows permuted)
    y = linear(a, Wd[:, p])

Legal when the gather's input is reached only through elementwise ops (mul, add, silu, gelu, ...)
from Linear outputs, none of which is used outside that chain: permuting the producers' output
rows then permutes the chain's output identically. The producers are marked
``meta["pt2pass_output_perm"]`` so lowering permutes their packed rows, scales and bias too.
Gathers that cannot be folded (inputs from the residual stream through a norm, the attention
output feeding o_proj) stay, and ``self.remaining`` says why.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Set, Tuple

import torch
import torch.fx as fx

from ..capture import LINEAR_OP, WEIGHT_FQN
from ..lowering.lower import GATHER, OUTPUT_PERM, fetch_attr
from ..pass_manager import Pass, PassResult
from ..store import store_of
from .linear_sites import get_weight, set_weight

log = logging.getLogger(__name__)

aten = torch.ops.aten
ELEMENTWISE = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.silu.default,
               aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default}


class FoldPermutations(Pass):
    def __init__(self):
        self.folded = 0
        self.remaining: List[Tuple[str, str]] = []

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.folded, self.remaining = 0, []
        for gather in [n for n in gm.graph.nodes if n.meta.get(GATHER)]:
            perm = fetch_attr(gm, gather.args[2].target)
            producers, reason = _foldable_producers(gather, store_of(gm), perm.numel())
            if producers is None:
                self.remaining.append((gather.meta[GATHER], reason))
                continue
            for linear in producers:
                _permute_rows(gm, linear, perm)
            gather.replace_all_uses_with(gather.args[0])
            gm.graph.erase_node(gather)
            self.folded += 1
        gm.graph.eliminate_dead_code()
        log.info("folded %d gathers into their producers; %d remain: %s", self.folded,
                 len(self.remaining), "; ".join(f"{f} ({r})" for f, r in self.remaining))
        return PassResult(gm, modified=self.folded > 0)


def _foldable_producers(gather: fx.Node, store, width: int) -> Tuple[Optional[List[fx.Node]], str]:
    """The Linear nodes whose rows can absorb ``gather``'s permutation (of ``width`` features), or
    None and why not.

    Only ternary Linears do: their rows are put back in order when saved (a full-precision
    producer, kept by ``skip`` or unpackable, was saved permuted and permuted again on load), and
    a quantized weight is read by no other node (a shared one would be permuted for its other
    reader too). Every value on the way must have all ``width`` features: one broadcast along
    them (a gate of one output multiplying a wide one) has no rows to permute."""
    chain: Set[fx.Node] = set()
    producers: List[fx.Node] = []
    stack = [gather.args[0]]
    while stack:
        node = stack.pop()
        if node in chain:
            continue
        chain.add(node)
        if node.target is LINEAR_OP and WEIGHT_FQN in node.meta:
            fqn = node.meta[WEIGHT_FQN]
            if fqn not in store or not store[fqn].is_ternary:
                return None, f"{fqn} is not ternary (kept in full precision or shared)"
            if store[fqn].shape[0] != width:
                return None, f"{fqn} has {store[fqn].shape[0]} outputs, broadcast over {width} features"
            producers.append(node)
        elif node.op == "call_function" and node.target in ELEMENTWISE:
            val = node.meta.get("val")
            if val is not None and (val.dim() == 0 or val.shape[-1] != width):
                return None, f"{node.name} has {tuple(val.shape)}, broadcast over {width} features"
            for arg in node.args:
                if isinstance(arg, fx.Node):
                    stack.append(arg)
                elif not isinstance(arg, (int, float)):
                    return None, f"{node.name} has a non-scalar constant operand"
        else:
            return None, f"input comes from {node.name} ({node.target}), which cannot absorb it"
    allowed = chain | {gather}
    for node in chain:
        outside = [u for u in node.users if u not in allowed]
        if outside:
            return None, f"{node.name} is also used by {outside[0].name}"
    return producers, ""


def _permute_rows(gm: fx.GraphModule, linear: fx.Node, perm: torch.Tensor) -> None:
    fqn = linear.meta[WEIGHT_FQN]
    w = get_weight(gm, fqn)
    set_weight(gm, fqn, w.index_select(0, perm.to(w.device)))
    bias = linear.args[2] if len(linear.args) > 2 else None
    if isinstance(bias, fx.Node):
        b = fetch_attr(gm, bias.target)
        set_weight(gm, bias.target, b.index_select(0, perm.to(b.device)))
    previous = linear.meta.get(OUTPUT_PERM)
    linear.meta[OUTPUT_PERM] = perm if previous is None else previous[perm]
