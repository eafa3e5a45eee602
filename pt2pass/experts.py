"""MoE experts in a captured graph: grouped matmuls over a 3-D weight of stacked experts.

transformers 5 holds a MoE block's experts as one 3-D parameter per projection, (E, out, in)
(Mixtral, Qwen2/3-MoE, ...: ``experts.gate_up_proj``, ``experts.down_proj``), and runs them as one
grouped matmul over the tokens sorted by expert:

    w_t = aten.transpose(get_attr[...experts.gate_up_proj], -2, -1)      # (E, in, out)
    y   = grouped_mm(x_sorted, w_t, offs)    # rows offs[e-1]:offs[e] of x_sorted go to expert e

``grouped_mm`` is ``aten._grouped_mm`` where torch has a kernel for the dtype (bf16) and
``transformers::grouped_mm_fallback`` (a loop over experts) otherwise. Capture tags these nodes
with the 3-D weight's FQN (``meta[WEIGHT_FQN]``), like Linears; each expert is then one (out, in)
matrix quantized from the Hessian of the rows routed to it, and the lowering replaces the node with
``pt2pass::ternary_experts``. Layouts stored (E, in, out) (``is_transposed`` experts, e.g. GPT-OSS)
are not recognised and stay in full precision (the capture warning counts them).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_FQN = "pt2pass_weight_fqn"  # the same tag as a Linear's (capture.WEIGHT_FQN)
_TRANSPOSE = torch.ops.aten.transpose.int


def grouped_mm_ops() -> Tuple:
    """The grouped matmul overloads an experts node may call (transformers' op only once
    transformers registered it)."""
    ops = [torch.ops.aten._grouped_mm.default]
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        ops.append(fallback.default)
    return tuple(ops)


def is_grouped_mm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in grouped_mm_ops()


def experts_parts(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, fx.Node]]:
    """(x, the 3-D weight's get_attr node, offs) of a grouped matmul ``grouped_mm(x,
    transpose(weight, -2, -1), offs)``; None for any other form (a bias, an output dtype, a weight
    used as stored)."""
    if not is_grouped_mm(node):
        return None
    args = list(node.args) + [node.kwargs[k] for k in ("offs",) if k in node.kwargs]
    extra = {k: v for k, v in node.kwargs.items() if k != "offs" and v is not None}
    if len(args) != 3 or extra or not all(isinstance(a, fx.Node) for a in args):
        return None
    x, w_t, offs = args
    if w_t.op != "call_function" or w_t.target is not _TRANSPOSE:
        return None
    weight, dims = w_t.args[0], tuple(d % 3 for d in w_t.args[1:])
    if not isinstance(weight, fx.Node) or weight.op != "get_attr" or sorted(dims) != [1, 2]:
        return None
    return x, weight, offs


def tag_experts(gm: fx.GraphModule, model: nn.Module) -> Dict[str, fx.Node]:
    """Set ``meta[WEIGHT_FQN]`` on each grouped matmul over a 3-D parameter of ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    found = {}
    for node in gm.graph.nodes:
        parts = experts_parts(node)
        if parts is None:
            if is_grouped_mm(node):
                log.warning("grouped matmul %s has a form pt2pass does not rewrite (bias, output "
                            "dtype or an (E, in, out) weight); it stays in full precision", node.name)
            continue
        weight = parts[1]
        if weight.target in params and params[weight.target].dim() == 3:
            node.meta[WEIGHT_FQN] = weight.target
            found[weight.target] = node
    return found


def experts_nodes(gm: fx.GraphModule) -> Dict[str, fx.Node]:
    """Weight FQN -> grouped matmul node, for the experts nodes tagged at capture."""
    return {n.meta[WEIGHT_FQN]: n for n in gm.graph.nodes if is_grouped_mm(n) and WEIGHT_FQN in n.meta}
