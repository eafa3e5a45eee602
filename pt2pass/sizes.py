"""Bytes and bits per weight of Linear layers, before and after ternarization."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.fx as fx
from torch import nn

from .lowering.lower import TERNARY_OP


@dataclass
class LinearSizes:
    n_weights: int            # weights in the ternarized Linears
    dense_bytes_16bit: int    # those weights at 16 bits
    packed_bytes: int         # codes + alpha + mu + permutations + bias as stored
    n_layers: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.packed_bytes / max(self.n_weights, 1)

    def describe(self) -> str:
        mb = 1e6
        return (f"{self.n_layers} ternary Linears, {self.n_weights / 1e6:.1f}M weights: "
                f"{self.dense_bytes_16bit / mb:.1f} MB at 16 bit -> {self.packed_bytes / mb:.1f} MB "
                f"packed ({self.bits_per_weight:.2f} bits/weight all-in, "
                f"{self.dense_bytes_16bit / max(self.packed_bytes, 1):.1f}x smaller)")


def _attr(gm: fx.GraphModule, node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def ternary_linear_sizes(gm: fx.GraphModule) -> LinearSizes:
    """Sizes of the ``pt2pass.ternary_linear`` layers of a lowered graph."""
    n_weights = packed = layers = 0
    for node in gm.graph.nodes:
        if node.target is not TERNARY_OP:
            continue
        layers += 1
        tensors = [_attr(gm, a) for a in node.args[1:] if isinstance(a, fx.Node) and a.op == "get_attr"]
        packed += sum(t.numel() * t.element_size() for t in tensors)
        codes = _attr(gm, node.args[1])
        n_weights += codes.shape[0] * codes.shape[1] * 16
    return LinearSizes(n_weights, 2 * n_weights, packed, layers)


def dense_linear_bytes(model: nn.Module) -> Dict[str, int]:
    """Weights and bytes of all nn.Linear layers of a module (tied weights counted once)."""
    seen, weights, nbytes = set(), 0, 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            weights += m.weight.numel()
            nbytes += m.weight.numel() * m.weight.element_size()
    return {"weights": weights, "bytes": nbytes}
