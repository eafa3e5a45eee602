"""Glue between graph passes and the pure math in pt2pass.quant: one Linear at a time.

This is the seam where the quantizer plugs in: passes call :func:`quantize_linear` (or a
user-supplied function with the same signature) with the weight, its input Hessian and the config.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.fx as fx

from ..config import TernaryConfig
from ..quant.result import dequantize_blocks, unpermute
from ..store import LayerQuant

log = logging.getLogger(__name__)

QuantizeFn = Callable[[str, torch.Tensor, Optional[torch.Tensor], TernaryConfig], "tuple"]
FP16_MAX = torch.finfo(torch.float16).max


def quantize_linear(fqn: str, W: torch.Tensor, H: Optional[torch.Tensor], config: TernaryConfig,
                    scale_dtype: torch.dtype = torch.float16):
    """Quantize one weight; return (LayerQuant, Q) with Q the dense weight in original column order.

    alpha and mu are rounded to ``scale_dtype`` (what the packed format stores) and Q is rebuilt
    from the rounded values, so that later layers calibrate against exactly the deployed weights.
    """
    from ..quant import ternarize_weight  # the math package (no torch.fx inside)

    start = time.perf_counter()
    result = ternarize_weight(W.detach().float(), H, config)
    alpha, mu, Q = result.alpha, result.mu, result.Q
    if config.method in ("pt2", "rtn"):
        if scale_dtype == torch.float16 and max(alpha.abs().max(), mu.abs().max()) > FP16_MAX:
            log.warning("%s: scales exceed float16 range, stored as float32", fqn)
            scale_dtype = torch.float32
        alpha, mu = alpha.to(scale_dtype), mu.to(scale_dtype)
        Q = unpermute(dequantize_blocks(result.T, alpha, mu, config.block_size), result.perm)
    stats = dict(result.stats)
    stats["seconds"] = round(time.perf_counter() - start, 4)
    layer = LayerQuant(fqn=fqn, method=config.method, T=result.T, alpha=alpha, mu=mu,
                       perm=result.perm, block_size=config.block_size, stats=stats)
    log.info("quantized %s %s: %s", fqn, tuple(W.shape),
             ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    return layer, Q.to(W.dtype)


class HessianCache:
    """H = (2/N) Σ xxᵀ per distinct Linear input (q/k/v share one input: counted once).

    An entry is dropped once every Linear reading that input has taken it.
    """

    def __init__(self, sites: Dict[str, fx.Node]):
        self.pending: Dict[fx.Node, List[str]] = {}
        for fqn, node in sites.items():
            self.pending.setdefault(node.args[0], []).append(fqn)
        self.hessians: Dict[fx.Node, torch.Tensor] = {}

    def take(self, fqn: str, linear: fx.Node, activations: List[torch.Tensor]) -> torch.Tensor:
        """The Hessian of ``linear``'s input, accumulated from ``activations`` on first request."""
        from ..quant import HessianAccumulator

        x_node = linear.args[0]
        if x_node not in self.hessians:
            first = activations[0]
            acc = HessianAccumulator(first.shape[-1], device=first.device)
            for x in activations:
                acc.add(x)
            self.hessians[x_node] = acc.hessian()
        H = self.hessians[x_node]
        self.pending[x_node].remove(fqn)
        if not self.pending[x_node]:
            del self.hessians[x_node]
        return H
