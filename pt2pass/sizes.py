"""Bytes and bits per weight of Linear layers, before and after ternarization."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.fx as fx
from torch import nn

from .lowering.lower import TERNARY_EXPERTS_OP, TERNARY_OP


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
        if self.n_layers == 0:  # e.g. the GPTQ baseline, which runs dense (not lowered)
            return "no ternary Linears in the graph (the quantized weights run dense)"
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
        if node.target not in (TERNARY_OP, TERNARY_EXPERTS_OP):
            continue
        layers += 1
        first = 1 if node.target is TERNARY_OP else 2  # ternary_experts(x, offs, packed, ...)
        tensors = [_attr(gm, a) for a in node.args[first:] if isinstance(a, fx.Node) and a.op == "get_attr"]
        packed += sum(t.numel() * t.element_size() for t in tensors)
        n_weights += _attr(gm, node.args[first]).numel() * 16  # 16 codes per int32 word
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


# "2bit": as held by the lowered graph (2-bit codes for the kernels, int32 permutation indices);
# "trit5": as saved by pt2pass.save (5 trits per byte, indices at ceil(log2 K) bits).
CODE_BITS = {"2bit": 2.0, "trit5": 8.0 / 5.0}
SCALE_BITS = 16   # alpha and mu are stored in fp16
PERM_BITS = 32    # permutation indices in the graph are int32


def _perm_bits(packing: str, k: int) -> int:
    if packing == "2bit":
        return PERM_BITS * k
    from .checkpoint.bitpack import index_bits

    return 8 * -(-k * index_bits(k) // 8)


def bits_per_weight(store, packing: str = "2bit") -> float:
    """All-in storage bits per weight of the quantized Linears in ``store``: codes, the two 16-bit
    scales per row per block, and permutation indices (GPTQ baselines: codes, an fp16 scale and a
    ``bits``-bit zero point per group). ``packing``: "2bit" (the lowered graph) or "trit5" (a
    checkpoint of ``pt2pass.save``; its codes are rounded up to whole bytes per row here too).
    GPTQ layers count at their nominal packed size in both: the checkpoint stores their codes
    one per byte (uint8) with fp32 scales, and the graph runs them dense. Scales a checkpoint
    keeps in fp32 (where fp16 would overflow) count as fp16 here."""
    if packing not in CODE_BITS:
        raise ValueError(f"packing={packing!r}; allowed: {sorted(CODE_BITS)}")
    total_bits = total_weights = 0.0
    for layer in store.layers.values():
        *experts, n, k = layer.shape
        n *= experts[0] if experts else 1  # stacked MoE experts: E x N rows of K weights
        groups = layer.alpha.shape[-1]
        if layer.is_ternary:
            codes = n * k * 2 if packing == "2bit" else n * 8 * -(-k // 5)
            bits = codes + 2 * SCALE_BITS * n * groups
        else:
            b = int(layer.stats.get("bits", 2))
            bits = n * k * b + (SCALE_BITS + b) * n * groups
        orders = layer.perm.numel() // k if layer.perm is not None else 0  # one per expert
        bits += orders * _perm_bits(packing, k)  # SSR / act-order
        total_bits += bits
        total_weights += n * k
    return total_bits / max(total_weights, 1)
