"""LowerDecodeAttention: scaled_dot_product_attention nodes become ``pt2pass.attention`` (decode graphs).

Before:  o = aten.scaled_dot_product_attention(q, k_cache, v_cache, mask, scale=s)
After:   o = pt2pass.attention(q, k_cache, v_cache, mask, s, enable_gqa)

With grouped-query attention HF repeats the cache's KV heads to the query heads first
(``repeat_kv``: unsqueeze, expand, reshape: a copy of the whole cache per layer and step); the
pass recognizes that chain and passes the cache itself with ``enable_gqa=True``.

The op computes the same thing, by SDPA itself everywhere but where a CUDA decode step asks for
one query position over the cache: there it runs the split-cache decode kernel
(kernels/decode_attention.py), which reads only the cache blocks the mask leaves visible. Only
nodes without dropout and without ``is_causal`` are rewritten (the decode graphs of HF causal LMs
pass an explicit mask). On by default in decode graphs since session 11, when it was timed on
the H200 (``PT2PASS_DECODE_ATTENTION=0`` turns it off; see decode.build_decode_graph).
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

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


_RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def repeated_kv(node) -> Optional[Tuple[fx.Node, int]]:
    """(cache, rep) when ``node`` is HF's ``repeat_kv(cache, rep)`` as traced:
    reshape(expand(unsqueeze(cache, 2), (B, Hkv, rep, L, D)), (B, Hkv * rep, L, D)); else None."""
    if not (isinstance(node, fx.Node) and node.target in _RESHAPES):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target is torch.ops.aten.expand.default):
        return None
    unsqueeze = expand.args[0]
    if not (isinstance(unsqueeze, fx.Node) and unsqueeze.target is torch.ops.aten.unsqueeze.default
            and unsqueeze.args[1] == 2):
        return None
    cache = unsqueeze.args[0]
    shapes = [n.meta["val"].shape if isinstance(n, fx.Node) and "val" in n.meta else None
              for n in (cache, expand, node)]
    if any(shape is None for shape in shapes) or len(shapes[0]) != 4:
        return None
    (b, hk, length, d), expanded, out = shapes
    rep = expanded[2] if len(expanded) == 5 else 0
    if rep < 1 or tuple(expanded) != (b, hk, rep, length, d) or tuple(out) != (b, hk * rep, length, d):
        return None
    return cache, rep


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
            key, value, gqa = a["key"], a["value"], a["enable_gqa"]
            k_rep, v_rep = repeated_kv(key), repeated_kv(value)
            if not gqa and k_rep and v_rep and k_rep[1] == v_rep[1]:
                # grouped-query attention: the op reads the cache itself, not a repeated copy
                key, value, gqa = k_rep[0], v_rep[0], True
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(ATTENTION_OP, (a["query"], key, value, a["attn_mask"], a["scale"], gqa))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            self.rewritten += 1
        gm.graph.eliminate_dead_code()  # the repeat_kv chains (in-place cache writes are kept: impure)
        gm.recompile()
        log.info("attention: %d SDPA nodes -> pt2pass.attention (%d kept: dropout or is_causal)",
                 self.rewritten, self.kept)
        return PassResult(gm, modified=bool(self.rewritten))

    def ensures(self, gm: fx.GraphModule) -> None:
        """The SDPA nodes left are the ones it kept."""
        left = sum(n.target is SDPA for n in gm.graph.nodes)
        if left != self.kept:
            raise AssertionError(f"LowerDecodeAttention left {left} SDPA nodes, expected {self.kept}")

