"""The quantization store: results keyed by weight FQN, independent of any one graph.

Keeping results out of the graph lets the same lowering apply to every graph of a model (the
full-sequence graph and a decode-step graph) and makes a checkpoint just this store, saved.
The store of a GraphModule lives in ``gm.meta["pt2pass_store"]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.fx as fx

from .lowering.format import WEIGHTS_PER_WORD, pack_ternary, unpack_codes

STORE_KEY = "pt2pass_store"
TERNARY_METHODS = ("pt2", "rtn")


class LayerQuant:
    """What the quantizer produced for one Linear weight.

    Ternary codes are held 2-bit packed (``packed``, the kernels' format, see
    ``lowering/format.py``): an int8 ``T`` would cost 8 bits per weight for as long as the model
    lives, more than the lowered graph itself (a 7B model: 6.5 GB next to 1.8 GB). ``T`` unpacks
    on access; lowering uses ``packed`` directly, so every graph lowered from the store (full
    sequence, decode step) shares one copy of the codes. Codes of other methods (GPTQ baselines:
    integer levels) and ternary layers whose K is not a multiple of 16 stay unpacked.
    """

    def __init__(self, fqn: str, method: str, T: torch.Tensor, alpha: torch.Tensor,
                 mu: torch.Tensor, perm: Optional[torch.Tensor], block_size: int = 128,
                 stats: Optional[Dict[str, Any]] = None):
        self.fqn = fqn
        self.method = method
        self.alpha = alpha            # (N, ceil(K / block)) scales, blocks in perm order
        self.mu = mu                  # (N, ceil(K / block)) offsets
        self.perm = perm              # int64 (K,) or None (natural order)
        # stacked MoE experts (see is_experts) carry a leading expert dimension on every tensor
        self.block_size = block_size  # columns per (alpha, mu) block; the last may be partial
        self.stats = dict(stats or {})
        self.T = T                    # int8 (N, K), columns in quantization (perm) order

    @classmethod
    def from_packed(cls, fqn: str, method: str, packed: torch.Tensor, in_features: int, alpha: torch.Tensor,
                    mu: torch.Tensor, perm: Optional[torch.Tensor], block_size: int = 128,
                    stats: Optional[Dict[str, Any]] = None) -> "LayerQuant":
        """A ternary layer from codes already packed ((..., in_features / 16) int32): stacking
        experts' packed codes needs no unpacking and packing again."""
        layer = cls(fqn, method, torch.empty((0, in_features), dtype=torch.int8), alpha, mu, perm,
                    block_size, stats)
        layer.packed, layer.shape = packed, (*packed.shape[:-1], in_features)
        return layer

    @property
    def T(self) -> torch.Tensor:
        if self.packed is None:
            return self._T
        if self.packed.dim() == 3:  # one expert at a time: the int32 intermediates stay small
            return torch.stack([unpack_codes(p) for p in self.packed])
        return unpack_codes(self.packed)

    @T.setter
    def T(self, value: torch.Tensor) -> None:
        self.shape = tuple(value.shape)
        if self.is_ternary and value.dim() in (2, 3) and value.shape[-1] % WEIGHTS_PER_WORD == 0:
            # rejects values outside {-1, 0, 1}; stacked experts packed one at a time (int64 intermediates)
            self.packed = pack_ternary(value) if value.dim() == 2 else torch.stack([pack_ternary(t) for t in value])
            self._T = None
        else:
            self.packed, self._T = None, value

    @property
    def is_experts(self) -> bool:
        """True for stacked MoE experts: T (E, N, K), alpha / mu (E, N, blocks), perm (E, K)."""
        return len(self.shape) == 3

    @property
    def is_ternary(self) -> bool:
        """True when the layer can be lowered to ``pt2pass::ternary_linear``."""
        return self.method in TERNARY_METHODS

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """alpha * T + mu in ``dtype`` and the weight's own column order, (N, K) or stacked
        (E, N, K); experts are filled one at a time (float32 for all at once would double a bf16
        stack's size)."""
        from .quant.result import dequantize_blocks, unpermute

        def one(T, alpha, mu, perm):
            return unpermute(dequantize_blocks(T, alpha, mu, self.block_size), perm).to(dtype)

        if not self.is_experts:
            return one(self.T, self.alpha, self.mu, self.perm)
        out = torch.empty(self.shape, dtype=dtype, device=self.alpha.device)
        for e in range(self.shape[0]):
            T = unpack_codes(self.packed[e]) if self.packed is not None else self._T[e]
            out[e] = one(T, self.alpha[e], self.mu[e], None if self.perm is None else self.perm[e])
        return out

    def to(self, device) -> "LayerQuant":
        """Move codes, scales and permutation to ``device`` (in place; returns self)."""
        if self.packed is not None:
            self.packed = self.packed.to(device)
        else:
            self._T = self._T.to(device)
        self.alpha, self.mu = self.alpha.to(device), self.mu.to(device)
        self.perm = None if self.perm is None else self.perm.to(device)
        return self

    def __repr__(self) -> str:
        return f"LayerQuant({self.fqn!r}, {self.method!r}, shape={self.shape}, perm={self.perm is not None})"


@dataclass
class QuantStore:
    layers: Dict[str, LayerQuant] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)

    def __contains__(self, fqn: str) -> bool:
        return fqn in self.layers

    def __getitem__(self, fqn: str) -> LayerQuant:
        return self.layers[fqn]

    def __setitem__(self, fqn: str, value: LayerQuant) -> None:
        self.layers[fqn] = value

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def report(self) -> List[Dict[str, Any]]:
        """One row per quantized layer: FQN, shape and the quantizer's statistics."""
        return [{"layer": fqn, "shape": list(q.shape), "method": q.method, **q.stats}
                for fqn, q in self.layers.items()]


def store_of(gm: fx.GraphModule) -> QuantStore:
    """The store attached to ``gm`` (created empty on first use)."""
    store = gm.meta.get(STORE_KEY)
    if store is None:
        store = gm.meta[STORE_KEY] = QuantStore()
    return store
