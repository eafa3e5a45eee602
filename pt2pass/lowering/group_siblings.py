"""GroupSiblingLinears: ternary Linears that read the same x become one grouped op (decode graphs).

Before:  q = pt2pass.ternary_linear(h, Pq, ...);  k = ...(h, Pk, ...);  v = ...(h, Pv, ...)
After:   qkv = pt2pass.ternary_linear_group(h, [Pq, Pk, Pv], [aq, ak, av], ...)
         q = qkv[0];  k = qkv[1];  v = qkv[2]

At batch 1 the grouped op is one GEMV launch for the whole group (kernels/gemv_group.py): q/k/v
and gate/up of a decoder layer stop paying a launch, a ramp-up and a tail (and, for small N, a
split-K reduce) each. The members keep their own buffers (the get_attr targets are unchanged, so
graphs lowered from the same store still share them) and their own SSR permutations; on CPU, and
on the GPU where the grouped kernel does not apply, the op runs each member as ungrouped.
Members are grouped when they read the same node with the same block size and the same presence
of bias and permutation, at most :data:`MAX_GROUP` per group, in graph order.
"""
from __future__ import annotations

import logging
import operator
from typing import Dict, List, Tuple

import torch
import torch.fx as fx

from ..capture import WEIGHT_FQN
from ..pass_manager import Pass, PassResult
from .format import DEFAULT_BLOCK_SIZE
from .lower import TERNARY_OP

log = logging.getLogger(__name__)

GROUP_OP = torch.ops.pt2pass.ternary_linear_group.default
ADD_NORM_GROUP_OP = torch.ops.pt2pass.add_rms_norm_linear_group.default  # FuseAddRMSNorm's
MAX_GROUP = 3  # = kernels.gemv_group.MAX_MEMBERS (q, k, v); not imported: that module needs triton
_ARG_NAMES = ("x", "packed", "alpha", "mu", "bias", "perm", "block_size")


def op_arguments(node: fx.Node) -> Dict[str, object]:
    """The seven arguments of a ternary_linear node by name, defaults filled in."""
    values = dict(zip(_ARG_NAMES, node.args))
    values.update(node.kwargs)
    values.setdefault("bias", None)
    values.setdefault("perm", None)
    values.setdefault("block_size", DEFAULT_BLOCK_SIZE)
    return values


def _members(node: fx.Node) -> int:
    """Ternary Linears one node computes: 1 for ternary_linear, the packed list's length for the
    grouped ops (ternary_linear_group; add_rms_norm_linear_group, whose list is its 5th argument)."""
    if node.target is TERNARY_OP:
        return 1
    if node.target is GROUP_OP:
        return len(node.args[1])
    if node.target is ADD_NORM_GROUP_OP:
        return len(node.args[4])
    return 0


def count_ternary_linears(graph: fx.Graph) -> int:
    """Ternary Linears computed by ``graph``: ternary_linear nodes plus the members of groups."""
    return sum(_members(n) for n in graph.nodes)


def describe_ternary_ops(graph: fx.Graph) -> str:
    """"14 pt2pass.ternary_linear nodes", or with groups "14 ternary Linears: 4
    pt2pass.ternary_linear nodes, 4 pt2pass.ternary_linear_group nodes" (and the fused
    add_rms_norm_linear_group nodes, when there are)."""
    counts = [(sum(n.target is op for n in graph.nodes), name) for op, name in (
        (TERNARY_OP, "pt2pass.ternary_linear"), (GROUP_OP, "pt2pass.ternary_linear_group"),
        (ADD_NORM_GROUP_OP, "pt2pass.add_rms_norm_linear_group"))]
    if not counts[1][0] and not counts[2][0]:
        return f"{counts[0][0]} pt2pass.ternary_linear nodes"
    return (f"{count_ternary_linears(graph)} ternary Linears: "
            + ", ".join(f"{c} {name} nodes" for c, name in counts if c or name == "pt2pass.ternary_linear"))


class GroupSiblingLinears(Pass):
    def __init__(self):
        self.groups: List[int] = []  # members per group made by the last call

    def call(self, gm: fx.GraphModule) -> PassResult:
        siblings: Dict[Tuple, List[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.target is TERNARY_OP:
                a = op_arguments(node)
                key = (a["x"], a["block_size"], a["bias"] is None, a["perm"] is None)
                siblings.setdefault(key, []).append(node)
        self.groups = []
        for nodes in siblings.values():
            # Chunks by position: a chunk with a member whose input comes late stays ungrouped
            # (rare: LLaMA-like models compute every sibling input before the first sibling).
            for start in range(0, len(nodes), MAX_GROUP):
                members = nodes[start:start + MAX_GROUP]
                # positions afresh: an earlier group's getitems may now be some members' inputs
                order = {n: i for i, n in enumerate(gm.graph.nodes)}
                if len(members) > 1 and _inputs_ready(members, order):
                    _group(gm, members)
                    self.groups.append(len(members))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        log.info("grouped %d ternary Linears into %d launches", sum(self.groups), len(self.groups))
        return PassResult(gm, modified=bool(self.groups))


def _inputs_ready(members: List[fx.Node], order: Dict[fx.Node, int]) -> bool:
    """Every non-get_attr input of every member is computed before the first member (get_attr
    nodes are re-created where the group goes)."""
    first = order[members[0]]
    for node in members:
        for value in op_arguments(node).values():
            if isinstance(value, fx.Node) and value.op != "get_attr" and order[value] >= first:
                return False
    return True


def _group(gm: fx.GraphModule, members: List[fx.Node]) -> None:
    args = [op_arguments(n) for n in members]
    graph = gm.graph
    with graph.inserting_before(members[0]):
        def attr(value):
            return graph.get_attr(value.target) if isinstance(value, fx.Node) and value.op == "get_attr" else value

        lists = {name: [attr(a[name]) for a in args] for name in ("packed", "alpha", "mu", "bias", "perm")}
        group = graph.call_function(GROUP_OP, (args[0]["x"], lists["packed"], lists["alpha"], lists["mu"],
                                               lists["bias"], lists["perm"], args[0]["block_size"]))
        group.meta["val"] = [n.meta.get("val") for n in members]
        group.meta[WEIGHT_FQN + "s"] = [n.meta.get(WEIGHT_FQN) for n in members]
        for i, node in enumerate(members):
            item = graph.call_function(operator.getitem, (group, i))
            item.meta.update(node.meta)
            node.replace_all_uses_with(item)
    for node in members:
        graph.erase_node(node)
