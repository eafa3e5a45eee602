"""FuseAddRMSNorm: residual add + LLaMA-style RMSNorm + grouped ternary Linears -> one op (decode graphs).

Before:  h = add(r, d);  f = to(h, float32);  v = mean(pow(f, 2), [-1], keepdim);  s = rsqrt(add(v, eps))
         x = mul(w, to(mul(f, s), h.dtype));  ys = pt2pass.ternary_linear_group(x, [P...], ...)
After:   out = pt2pass.add_rms_norm_linear_group(r, d, w, eps, [P...], ...);  h = out[0];  ys = out[1:]

This is transformers' LlamaRMSNorm (also Mistral's, Qwen2/3's, ...) in the aten ops torch.export
records, after GroupSiblingLinears. Fused, a decoder layer's two norms stop costing a launch each
at batch 1 on the GPU (kernels/norm_group.py does the add and the norm inside the grouped GEMV's x
quantization); on CPU the op runs the same ops as the graph did, so results are equal to the bit.
Only that exact sequence is matched, with every intermediate used inside it (and by torch.export's
``_assert_tensor_metadata`` checks, removed with it); other norms (Gemma's 1 + w, LayerNorm, a
norm whose output has other users) and a first layer's norm of the embedding (no add) stay as they
are. ``PT2PASS_FUSE_NORM=1`` puts it into decode graphs. Off by default: on the H100 (session 17)
its GPU path is correct but the 8-layer 7B decode step took 689 us with it against 669 without:
the fused quantize launch took 4.8 us where Inductor's norm plus the plain quantize took ~4.1.
"""
from __future__ import annotations

import logging
import operator
import os
from typing import List, Optional, Tuple

import torch
import torch.fx as fx

from ..pass_manager import Pass, PassResult
from .group_siblings import ADD_NORM_GROUP_OP as FUSED_OP
from .group_siblings import GROUP_OP
from .lower import fetch_attr

log = logging.getLogger(__name__)

aten = torch.ops.aten
_ASSERT = aten._assert_tensor_metadata.default


def fuse_norm_default() -> bool:
    """Whether decode graphs take FuseAddRMSNorm: only with ``PT2PASS_FUSE_NORM=1`` (it passed its
    GPU check but was 3 % slower per decode step on the H100, session 17: module doc)."""
    value = os.environ.get("PT2PASS_FUSE_NORM", "0")
    if value not in ("0", "1"):
        raise ValueError(f"PT2PASS_FUSE_NORM={value!r}: use 1 (fuse the add and RMSNorm into the grouped GEMV) or 0")
    return value == "1"


def _call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _cast_source(node, dtype=None) -> Optional[fx.Node]:
    """x when ``node`` is x.to(dtype) (aten.to.dtype or _to_copy with only a dtype), else None."""
    if _call(node, aten.to.dtype) and not node.kwargs and len(node.args) == 2:
        got = node.args[1]
    elif _call(node, aten._to_copy.default) and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
        got = node.kwargs["dtype"]
    else:
        return None
    return node.args[0] if dtype is None or got == dtype else None


def _other(mul: fx.Node, known: fx.Node) -> Optional[fx.Node]:
    """The factor of a two-node aten.mul that is not ``known``."""
    if not _call(mul, aten.mul.Tensor) or mul.kwargs or len(mul.args) != 2 or known not in mul.args:
        return None
    other = mul.args[1] if mul.args[0] is known else mul.args[0]
    return other if isinstance(other, fx.Node) else None


def match_add_rms_norm(x: fx.Node) -> Optional[Tuple[fx.Node, float, fx.Node, List[fx.Node]]]:
    """(h, eps, weight, nodes) when ``x`` is LLaMA's RMSNorm of h = a + b times a weight
    parameter, every intermediate used only inside the pattern; ``nodes`` from x back to the
    float32 cast of h. None otherwise."""
    if not _call(x, aten.mul.Tensor) or len(x.args) != 2:
        return None
    weight = next((a for a in x.args if isinstance(a, fx.Node) and a.op == "get_attr"), None)
    down = _other(x, weight) if weight is not None else None
    scaled = _cast_source(down) if down is not None else None
    if scaled is None or not _call(scaled, aten.mul.Tensor) or len(scaled.args) != 2:
        return None
    rsqrt = next((a for a in scaled.args if _call(a, aten.rsqrt.default)), None)
    f = _other(scaled, rsqrt) if rsqrt is not None else None
    h = _cast_source(f, torch.float32) if f is not None else None
    shifted = rsqrt.args[0] if rsqrt is not None else None
    if h is None or not _call(shifted, aten.add.Tensor) or len(shifted.args) != 2 or shifted.kwargs:
        return None
    mean, eps = shifted.args
    if not (_call(mean, aten.mean.dim) and isinstance(eps, float) and tuple(mean.args[1:]) in (([-1], True),)
            and not mean.kwargs and _call(mean.args[0], aten.pow.Tensor_Scalar)
            and mean.args[0].args == (f, 2)):
        return None
    square = mean.args[0]
    nodes = [x, down, scaled, rsqrt, shifted, mean, square, f]
    inside = set(nodes)
    for node in nodes[1:]:
        if any(u not in inside and u.target is not _ASSERT for u in node.users):
            return None
    if _cast_source(down, _val(h, "dtype")) is not scaled or not _is_add_of_two(h):
        return None
    return h, eps, weight, nodes


def _val(node: fx.Node, attr: str):
    val = node.meta.get("val")
    return getattr(val, attr, None)


def _is_add_of_two(h: fx.Node) -> bool:
    """h = a + b of two tensors of one shape and dtype (no alpha, no broadcasting)."""
    if not _call(h, aten.add.Tensor) or h.kwargs or len(h.args) != 2:
        return False
    a, b = h.args
    return (isinstance(a, fx.Node) and isinstance(b, fx.Node) and _val(a, "shape") is not None
            and _val(a, "shape") == _val(b, "shape") == _val(h, "shape")
            and _val(a, "dtype") == _val(b, "dtype") == _val(h, "dtype"))


class FuseAddRMSNorm(Pass):
    def __init__(self):
        self.fused = 0  # groups rewritten by the last call

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.fused = 0
        for group in [n for n in gm.graph.nodes if n.target is GROUP_OP]:
            x = group.args[0]
            match = match_add_rms_norm(x)
            if (match is not None and all(u is group or u.target is _ASSERT for u in x.users)
                    and _rewrite(gm, group, *match)):
                self.fused += 1
        if self.fused:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        log.info("fused %d residual adds + RMSNorms into grouped ternary Linears", self.fused)
        return PassResult(gm, modified=bool(self.fused))


def _rewrite(gm: fx.GraphModule, group: fx.Node, h: fx.Node, eps: float, weight: fx.Node,
             nodes: List[fx.Node]) -> bool:
    graph = gm.graph
    k = _val(h, "shape")[-1]
    w = fetch_attr(gm, weight.target)
    if not (isinstance(w, torch.Tensor) and tuple(w.shape) == (k,) and w.dtype == _val(h, "dtype")):
        return False  # the kernel takes the norm weight in the activations' dtype
    order = {n: i for i, n in enumerate(graph.nodes)}
    later = [u for u in h.users if u is not nodes[-1] and u.target is not _ASSERT]
    # the fused node sits where the group was: h's other readers must come after it, and the
    # group's outputs must be plain getitems (GroupSiblingLinears makes nothing else)
    if any(order[u] < order[group] for u in later) or any(u.target is not operator.getitem for u in group.users):
        return False
    a, b = h.args
    with graph.inserting_before(group):
        fused = graph.call_function(FUSED_OP, (a, b, weight, eps, *group.args[1:]))
        fused.meta.update(group.meta)
        fused.meta["val"] = [h.meta.get("val"), *(group.meta.get("val") or [])]
        h_out = graph.call_function(operator.getitem, (fused, 0))
        h_out.meta.update(h.meta)
    for item in list(group.users):
        item.args = (fused, item.args[1] + 1)
    for user in later:
        user.replace_input_with(h, h_out)
    for node in [group, *nodes, h]:
        for check in [u for u in node.users if u.target is _ASSERT]:
            graph.erase_node(check)
        if not node.users:
            graph.erase_node(node)
    return True
