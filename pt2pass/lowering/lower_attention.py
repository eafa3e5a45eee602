"""LowerDecodeAttention: scaled_dot_product_attention nodes become ``pt2pass.attention`` (decode graphs).

Before:  o = aten.scaled_dot_product_attention(q, k_cache, v_cache, mask, scale=s)
After:   o = pt2pass.attention(q, k_cache, v_cache, mask, s, enable_gqa)

The op computes the same thing, by SDPA itself everywhere but where a CUDA decode step asks for
one query position over the cache: there it runs the split-cache decode kernel
(kernels/decode_attention.py), which reads only the cache blocks the mask leaves visible. Only
nodes without dropout and without ``is_causal`` are rewritten (the decode graphs of HF causal LMs
pass an explicit mask). Off by default until timed on a GPU (see decode.build_decode_graph).
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx

from ..pass_manager import Pass, PassResult
from . import ops  # noqa: F401  (registers pt2pass.attention)

log = logging.getLogger(__name__)

SDPA = torch.ops.aten.scaled_dot_product_attention.default
ATTENTION_OP = torch.ops.pt2pass.attention.default
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_arguments(node: fx.Node) -> dict:
    """The arguments of an SDPA node by name, defaults filled in."""
    values = dict(_SDPA_DEFAULTS)
    values.update(zip(_SDPA_ARGS, node.args))
    values.update(node.kwargs)
    return values


class LowerDecodeAttention(Pass):
    def __init__(self):
        self.rewritten = 0
        self.kept = 0

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.rewritten = self.kept = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not SDPA:
                continue
            a = sdpa_arguments(node)
            if a["dropout_p"] != 0.0 or a["is_causal"]:
                self.kept += 1
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(ATTENTION_OP, (a["query"], a["key"], a["value"], a["attn_mask"],
                                                            a["scale"], a["enable_gqa"]))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            self.rewritten += 1
        gm.recompile()
        log.info("attention: %d SDPA nodes -> pt2pass.attention (%d kept: dropout or is_causal)",
                 self.rewritten, self.kept)
        return PassResult(gm, modified=bool(self.rewritten))

    def ensures(self, gm: fx.GraphModule) -> None:
        left = sum(n.target is SDPA for n in gm.graph.nodes)
        if left != self.kept:
            raise AssertionError(f"LowerDecodeAttention left {left} SDPA nodes, expected {self.kept}")
