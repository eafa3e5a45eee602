"""TernarizeWeights: quantize every Linear weight in one go (no sequential calibration).

Before:  linear(x, W_fp)
After:   linear(x, Q) with Q = αT+μ (dequantized), store_of(gm)[fqn] = LayerQuant(...)

Uses the Hessians recorded by :class:`CaptureCalibration` when present (all from full-precision
activations); data-free methods (``method="rtn"``) need none.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ..capture import require_captured
from ..config import CompileConfig
from ..pass_manager import Pass, PassResult
from ..store import store_of
from .calibrate import HESSIANS
from .expert_sites import quantizable_experts, skip_with_routers
from .layer_quantizer import quantize_experts, quantize_linear
from .linear_sites import get_weight, quantizable_linears, require_unpermuted, set_weight


class TernarizeWeights(Pass):
    def __init__(self, config: Optional[CompileConfig] = None,
                 quantize_fn: Callable = quantize_linear, progress: bool = True):
        self.config = config or CompileConfig()
        self.quantize_fn = quantize_fn
        self.progress = progress

    def requires(self, gm: fx.GraphModule) -> None:
        require_captured(gm, self.name)
        require_unpermuted(gm, self.name)
        if self.config.ternary.needs_calibration and HESSIANS not in store_of(gm).config:
            raise ValueError(f"method {self.config.ternary.method!r} with these settings needs "
                             "calibration: run CaptureCalibration first")

    def call(self, gm: fx.GraphModule) -> PassResult:
        store = store_of(gm)
        hessians = store.config.get(HESSIANS, {})
        skip = skip_with_routers(gm, self.config)
        sites = quantizable_linears(gm, skip)
        experts = quantizable_experts(gm, skip)
        with torch.no_grad():
            for fqn in tqdm([*sites, *experts], desc="ternarize", unit="layer", disable=not self.progress):
                W = get_weight(gm, fqn)
                if fqn in experts:  # stacked MoE experts: a list of per-expert Hessians (or None)
                    layer, Q = quantize_experts(fqn, W, hessians.get(fqn), self.config.ternary,
                                                self.quantize_fn)
                else:
                    layer, Q = self.quantize_fn(fqn, W, hessians.get(fqn), self.config.ternary)
                store[fqn] = layer
                set_weight(gm, fqn, Q)
        store.config.pop(HESSIANS, None)  # large, and no longer needed
        return PassResult(gm, modified=bool(sites or experts))
