"""InsertPermutations: make each SSR column permutation an explicit gather in the graph.

Before:  y = linear(x, Q)                        (Q in original column order)
After:   xp = index_select(x, -1, perm);  y = linear(xp, Q[:, perm])

The output is unchanged (the same products, summed in another order). Linears that read the same
input with the same permutation share one gather. The weight attribute now holds the permuted
columns and the node is marked ``meta["pt2pass_input_permuted"]`` so that lowering uses the
store's (already permuted) codes without a second permutation.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import torch
import torch.fx as fx

from ..capture import LINEAR_OP, STAGE, WEIGHT_FQN
from ..lowering.lower import GATHER, INPUT_PERMUTED, buffer_device, register_lowered_buffer
from ..pass_manager import Pass, PassResult
from ..store import store_of
from .linear_sites import get_weight, set_weight

log = logging.getLogger(__name__)

INDEX_SELECT = torch.ops.aten.index_select.default


def permuted_linears(gm: fx.GraphModule) -> List[fx.Node]:
    """Linear nodes whose stored result has a column permutation not yet made explicit."""
    store = store_of(gm)
    return [n for n in gm.graph.nodes if n.target is LINEAR_OP and not n.meta.get(INPUT_PERMUTED)
            and n.meta.get(WEIGHT_FQN) in store and store[n.meta[WEIGHT_FQN]].perm is not None]


class InsertPermutations(Pass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        store = store_of(gm)
        gathers: Dict[Tuple[fx.Node, bytes], fx.Node] = {}
        targets = permuted_linears(gm)
        for node in targets:
            fqn = node.meta[WEIGHT_FQN]
            perm = store[fqn].perm
            x = node.args[0]
            key = (x, perm.cpu().numpy().tobytes())
            if key not in gathers:
                gathers[key] = _insert_gather(gm, x, perm, fqn, node)
            w = get_weight(gm, fqn)
            set_weight(gm, fqn, w.index_select(1, perm.to(w.device)))
            node.replace_input_with(x, gathers[key])
            node.meta[INPUT_PERMUTED] = True
        log.info("inserted %d gathers for %d permuted Linears", len(gathers), len(targets))
        return PassResult(gm, modified=bool(targets))

    def ensures(self, gm: fx.GraphModule) -> None:
        if permuted_linears(gm):
            raise AssertionError("a permuted Linear has no explicit gather")


def _insert_gather(gm: fx.GraphModule, x: fx.Node, perm: torch.Tensor, fqn: str,
                   first_user: fx.Node) -> fx.Node:
    weight = get_weight(gm, fqn)
    target = register_lowered_buffer(gm, fqn, "input_perm", perm.to(buffer_device(gm, weight), torch.int32))
    with gm.graph.inserting_before(first_user):
        perm_node = gm.graph.get_attr(target)
        gather = gm.graph.call_function(INDEX_SELECT, (x, -1, perm_node))
    gather.meta[GATHER] = fqn
    gather.meta[STAGE] = first_user.meta.get(STAGE)
    if "val" in x.meta:
        gather.meta["val"] = x.meta["val"]
    return gather
