"""CaptureCalibration: run calibration batches through the graph and record each Linear's Hessian
(each MoE expert's, for stacked experts).

Before/after: the graph is unchanged; ``store_of(gm).config["hessians"]`` maps each quantizable
weight FQN to H = (2/N) Σ xxᵀ of its input, computed from full-precision activations. Linears
that read the same input (q/k/v) share one H tensor. This is the non-sequential building block
(quantize with :class:`TernarizeWeights` afterwards); :class:`SequentialTernarize` interleaves the
two stage by stage instead.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ..capture import require_captured
from ..pass_manager import Pass, PassResult
from ..runner import BatchedGraphRunner, PerBatch
from ..store import store_of
from .expert_sites import calibration_inputs, quantizable_experts
from .layer_quantizer import HessianCache, experts_hessians
from .linear_sites import get_weight, quantizable_linears

HESSIANS = "hessians"


class CaptureCalibration(Pass):
    def __init__(self, batches: List[Tuple[tuple, dict]], skip: Iterable[str] = ("lm_head",),
                 progress: bool = True):
        if not batches:
            raise ValueError("CaptureCalibration needs at least one calibration batch")
        self.batches, self.skip, self.progress = batches, tuple(skip), progress

    def requires(self, gm: fx.GraphModule) -> None:
        require_captured(gm, self.name)

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = quantizable_linears(gm, self.skip)
        experts = quantizable_experts(gm, self.skip)
        by_node = {node: fqn for fqn, node in sites.items()}
        by_experts = {node: fqn for fqn, node in experts.items()}
        runner = BatchedGraphRunner(gm, self.batches, targets=[*sites.values(), *experts.values()])
        cache = HessianCache(sites)
        shared: Dict[fx.Node, torch.Tensor] = {}
        hessians: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for stage, nodes in tqdm(runner.segments(), desc="calibrate", unit="stage",
                                     disable=not self.progress):
                for node in nodes:
                    if node in by_node:
                        x = runner.value(node.args[0])
                        values = x.values if isinstance(x, PerBatch) else [x]
                        H = shared.get(node.args[0])
                        if H is None:
                            H = shared[node.args[0]] = cache.take(by_node[node], node, values)
                        hessians[by_node[node]] = H
                    elif node in by_experts:  # one H per expert, from the rows routed to it
                        fqn = by_experts[node]
                        values = [runner.value(arg).values for arg in calibration_inputs(node)]
                        # all of them now (the activations are not kept past this stage), held on
                        # the CPU: E of them per layer (Mixtral's down_proj: 6.6 GB)
                        hessians[fqn] = [H.cpu() for H in experts_hessians(fqn, values, get_weight(gm, fqn))]
                    runner.run_node(node)
        store_of(gm).config[HESSIANS] = hessians
        return PassResult(gm, modified=False)

    def ensures(self, gm: fx.GraphModule) -> None:
        wanted = set(quantizable_linears(gm, self.skip)) | set(quantizable_experts(gm, self.skip))
        missing = wanted - set(store_of(gm).config[HESSIANS])
        if missing:
            raise AssertionError(f"no Hessian recorded for {sorted(missing)[:3]}")
