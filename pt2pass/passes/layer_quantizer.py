"""Glue between graph passes and the pure math in pt2pass.quant: one Linear at a time.

This is the seam where the quantizer plugs in: passes call :func:`quantize_linear` (or a
user-supplied function with the same signature) with the weight, its input Hessian and the config.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from ..config import TernaryConfig
from ..quant.result import dequantize_blocks, unpermute
from ..store import LayerQuant

log = logging.getLogger(__name__)

QuantizeFn = Callable[[str, torch.Tensor, Optional[torch.Tensor], TernaryConfig], "tuple"]
# Rounding alpha and mu to float16 moves Q by about 2^-11 relative; 4x that means precision loss.
FP16_REL_CHANGE = 2.0 ** -9


def quantize_linear(fqn: str, W: torch.Tensor, H: Optional[torch.Tensor], config: TernaryConfig,
                    scale_dtype: torch.dtype = torch.float16):
    """Quantize one weight; return (LayerQuant, Q) with Q the dense weight in original column order.

    alpha and mu are rounded to ``scale_dtype`` (what the packed format stores) and Q is rebuilt
    from the rounded values, so that later layers calibrate against exactly the deployed weights.
    """
    from ..quant import ternarize_weight  # the math package (no torch.fx inside)

    start = time.perf_counter()
    try:
        result = ternarize_weight(W.detach().float(), H, config)
    except ValueError as exc:  # the math does not know the layer's name
        raise ValueError(f"{fqn}: {exc}") from exc
    alpha, mu, Q = result.alpha, result.mu, result.Q
    if config.method in ("pt2", "rtn"):
        scale_dtype = _scale_dtype(fqn, result, scale_dtype)
        alpha, mu = alpha.to(scale_dtype), mu.to(scale_dtype)
        Q = unpermute(dequantize_blocks(result.T, alpha, mu, config.block_size), result.perm)
    stats = dict(result.stats)
    stats["seconds"] = round(time.perf_counter() - start, 4)
    layer = LayerQuant(fqn=fqn, method=config.method, T=result.T, alpha=alpha, mu=mu,
                       perm=result.perm, block_size=config.block_size, stats=stats)
    log.info("quantized %s %s: %s", fqn, tuple(W.shape), _describe(stats))
    return layer, Q.to(W.dtype)


def _scale_dtype(fqn: str, result, scale_dtype: torch.dtype) -> torch.dtype:
    """``scale_dtype``, or float32 when storing the scales in float16 would change the layer by
    more than float16's own rounding: overflow (> 65504) or tiny scales (subnormal below ~6e-5,
    e.g. 1e-6 keeps only ~4 significant bits)."""
    if scale_dtype != torch.float16:
        return scale_dtype
    exact = dequantize_blocks(result.T, result.alpha, result.mu, result.block_size)
    rounded = dequantize_blocks(result.T, result.alpha.half(), result.mu.half(), result.block_size)
    change = float((rounded - exact).norm())
    if change == change and change <= FP16_REL_CHANGE * float(exact.norm()):  # NaN fails too
        return scale_dtype
    log.warning("%s: float16 scales would change the weight by %.3g relative (overflow or "
                "subnormal scales); stored as float32", fqn,
                change / max(float(exact.norm()), torch.finfo(torch.float32).tiny))
    return torch.float32


def _describe(stats) -> str:
    """One log line of the scalar statistics (histories are for plots, not for the log)."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in stats.items() if not isinstance(v, (list, tuple)))


class HessianCache:
    """H = (2/N) Σ xxᵀ per distinct Linear input (q/k/v share one input: counted once).

    An entry is dropped once every Linear reading that input has taken it.
    """

    def __init__(self, sites: Dict[str, fx.Node]):
        self.pending: Dict[fx.Node, List[str]] = {}
        for fqn, node in sites.items():
            self.pending.setdefault(node.args[0], []).append(fqn)
        self.hessians: Dict[fx.Node, torch.Tensor] = {}

    def take(self, fqn: str, linear: fx.Node, activations: List[torch.Tensor],
             device: Optional[torch.device] = None) -> torch.Tensor:
        """The Hessian of ``linear``'s input, accumulated from ``activations`` on first request,
        on ``device`` (default: the activations' own; offloaded activations are moved per batch)."""
        from ..quant import HessianAccumulator

        x_node = linear.args[0]
        if x_node not in self.hessians:
            first = activations[0]
            acc = HessianAccumulator(first.shape[-1], device=device or first.device)
            for x in activations:
                try:
                    acc.add(x)
                except ValueError as exc:  # name the layer: "activations contain NaN" alone is not
                    readers = ", ".join(self.pending[x_node])
                    raise ValueError(f"calibration input of {readers} (graph node {x_node.name}): "
                                     f"{exc}") from exc
            self.hessians[x_node] = acc.hessian()
        H = self.hessians[x_node]
        self.pending[x_node].remove(fqn)
        if not self.pending[x_node]:
            del self.hessians[x_node]
        return H


def quantize_experts(fqn: str, W: torch.Tensor, hessians: Optional[Sequence[torch.Tensor]],
                     config: TernaryConfig, quantize_fn: QuantizeFn = quantize_linear):
    """Quantize stacked MoE experts W (E, N, K) one expert at a time (``quantize_fn`` on
    ``"fqn[e]"``, ``hessians[e]`` or None); return (one LayerQuant of the stacked results, Q (E, N, K)).

    Scales of one dtype (float32 for all when any expert needed it), permutations stacked (the
    identity for an expert quantized in natural order when another has one), statistics averaged
    over the experts (seconds summed)."""
    if W.dim() != 3:
        raise ValueError(f"{fqn}: stacked experts must be a 3-D (experts, out, in) tensor, got {tuple(W.shape)}")
    if hessians is not None and len(hessians) != W.shape[0]:
        raise ValueError(f"{fqn}: {len(hessians)} Hessians for {W.shape[0]} experts")
    layers, Qs = [], []
    for e in range(W.shape[0]):
        layer, Q = quantize_fn(f"{fqn}[{e}]", W[e], None if hessians is None else hessians[e], config)
        layers.append(layer)
        Qs.append(Q)
    return stack_experts(fqn, layers), torch.stack(Qs)


def stack_experts(fqn: str, layers: List[LayerQuant]) -> LayerQuant:
    """One LayerQuant for the experts' LayerQuants (see :func:`quantize_experts`)."""
    first = layers[0]
    if any(q.method != first.method or q.block_size != first.block_size or q.shape != first.shape
           for q in layers):
        raise ValueError(f"{fqn}: experts quantized with different methods, block sizes or shapes")
    dtype = torch.float32 if any(q.alpha.dtype == torch.float32 for q in layers) else first.alpha.dtype
    perm = None
    if any(q.perm is not None for q in layers):
        identity = torch.arange(first.shape[1], device=first.alpha.device)
        perm = torch.stack([identity if q.perm is None else q.perm for q in layers])
    stats = {}
    for key, value in first.stats.items():
        values = [q.stats.get(key) for q in layers]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            stats[key] = sum(values) if key == "seconds" else sum(values) / len(values)
    stats["experts"] = len(layers)
    parts = dict(alpha=torch.stack([q.alpha.to(dtype) for q in layers]),
                 mu=torch.stack([q.mu.to(dtype) for q in layers]), perm=perm,
                 block_size=first.block_size, stats=stats)
    if all(q.packed is not None for q in layers):
        return LayerQuant.from_packed(fqn, first.method, torch.stack([q.packed for q in layers]),
                                      first.shape[-1], **parts)
    return LayerQuant(fqn=fqn, method=first.method, T=torch.stack([q.T for q in layers]), **parts)


def experts_hessians(fqn: str, activations, W: torch.Tensor):
    """Each expert's Hessian from the rows routed to it, computed when indexed (see
    quant.GroupedHessians); ``activations`` = (rows sorted by expert, offsets) per batch."""
    from ..quant import GroupedHessians

    xs, offs = activations
    try:
        hessians = GroupedHessians(xs, offs, W.shape[0], device=W.device)
    except ValueError as exc:
        raise ValueError(f"calibration input of {fqn}: {exc}") from exc
    idle = [e for e, n in enumerate(hessians.counts) if n == 0]
    if idle:
        log.warning("%s: experts %s got no calibration token; quantized with the Hessian of all "
                    "the layer's tokens", fqn, idle)
    return hessians
