"""Which MoE experts nodes (grouped matmuls over a 3-D weight, see ``pt2pass/experts.py``) a
quantization pass rewrites: the counterpart of ``linear_sites`` for stacked expert weights."""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch.fx as fx

from ..capture import LINEAR_OP
from ..experts import WEIGHT_FQN, experts_parts, is_grouped_mm
from .linear_sites import get_weight, readers_by_tensor, tagged_by_weight, warn_excluded


def quantizable_experts(gm: fx.GraphModule, skip: Iterable[str] = ()) -> Dict[str, fx.Node]:
    """Weight FQN -> its grouped matmul node, for the experts a quantizer should rewrite; the
    others are logged with the reason (see :func:`classify_experts`)."""
    sites, excluded = classify_experts(gm, skip)
    warn_excluded(excluded)
    return sites


def classify_experts(gm: fx.GraphModule, skip: Iterable[str] = ()
                     ) -> Tuple[Dict[str, fx.Node], Dict[str, str]]:
    """(quantizable: weight FQN -> grouped matmul node, excluded: weight FQN -> reason)."""
    sites, excluded = {}, {}
    by_fqn = tagged_by_weight(gm, is_grouped_mm, tuple(skip), excluded)
    readers = readers_by_tensor(gm)
    for fqn, nodes in by_fqn.items():
        if len(nodes) > 1:
            excluded[fqn] = f"is used by {len(nodes)} grouped matmuls"
            continue
        weight = get_weight(gm, fqn)
        # the weight's only reader must be the transpose, read only by this grouped matmul
        w_t = nodes[0].args[1]
        other = [u for u in readers.get(id(weight), []) if u is not w_t]
        other += [u for u in w_t.users if u is not nodes[0]]
        if other:
            excluded[fqn] = f"is also read by {', '.join(u.name for u in other)}"
            continue
        sites[fqn] = nodes[0]
    return sites, excluded


def calibration_inputs(node: fx.Node) -> List[fx.Node]:
    """The graph values a quantized node's calibration needs: a Linear's input, or an experts
    node's rows sorted by expert and its per-expert offsets."""
    if node.target is LINEAR_OP:
        return [node.args[0]]
    x, _, offs = experts_parts(node)
    return [x, offs]


def router_linears(gm: fx.GraphModule) -> List[str]:
    """Weight FQNs of the MoE routers: the tagged Linears from which an experts node's ``offs``
    (its tokens per expert) is reached without passing another Linear. Every other Linear before
    the block reaches ``offs`` only through the router (hidden state -> router -> top-k -> offs)."""
    routers, seen = [], set()
    stack = [experts_parts(n)[2] for n in gm.graph.nodes if is_grouped_mm(n) and WEIGHT_FQN in n.meta]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.target is LINEAR_OP:
            if WEIGHT_FQN in node.meta and node.meta[WEIGHT_FQN] not in routers:
                routers.append(node.meta[WEIGHT_FQN])
            continue
        if not is_grouped_mm(node):
            stack.extend(node.all_input_nodes)
    return routers


def skip_with_routers(gm: fx.GraphModule, config) -> Tuple[str, ...]:
    """``config.skip`` plus the graph's MoE routers when ``config.keep_routers`` (CompileConfig):
    what the quantizing passes leave in full precision."""
    return config.skip + tuple(router_linears(gm)) if config.keep_routers else config.skip
