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

STORE_KEY = "pt2pass_store"
TERNARY_METHODS = ("pt2", "rtn")


@dataclass
class LayerQuant:
    """What the quantizer produced for one Linear weight."""

    fqn: str
    method: str
    T: torch.Tensor                       # int8 (N, K), columns in quantization (perm) order
    alpha: torch.Tensor                   # (N, ceil(K / block)) scales, blocks in perm order
    mu: torch.Tensor                      # (N, ceil(K / block)) offsets
    perm: Optional[torch.Tensor]          # int64 (K,) or None (natural order)
    block_size: int = 128                 # columns per (alpha, mu) block; the last may be partial
    stats: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_ternary(self) -> bool:
        """True when the layer can be lowered to ``pt2pass::ternary_linear``."""
        return self.method in TERNARY_METHODS

    @property
    def shape(self):
        return tuple(self.T.shape)


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
