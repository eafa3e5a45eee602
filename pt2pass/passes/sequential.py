"""SequentialTernarize: calibrate and quantize stage by stage (the GPTQ / PT²-LLM protocol).

Before:  linear(x, W_fp)              (every Linear, full-precision weights)
After:   linear(x, Q)                 (same graph, weights replaced by the dequantized αT+μ)
         + store_of(gm)[fqn] = LayerQuant(T, α, μ, perm, stats)

The calibration batches flow through the graph once (``sequential="linear"``): a Linear is
quantized as soon as all batches have reached it, from the Hessian of inputs produced by the
already-quantized Linears before it (q/k/v, then o, then gate/up, then down inside a block). With
``sequential="stage"`` every Linear of a decoder block sees full-precision block inputs, then the
block is re-run with quantized weights to feed the next block. Graph structure is unchanged.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Tuple

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ..capture import LINEAR_OP, require_captured
from ..config import CompileConfig
from ..pass_manager import Pass, PassResult
from ..runner import BatchedGraphRunner, PerBatch
from ..store import store_of
from .expert_sites import calibration_inputs, classify_experts, quantizable_experts, skip_with_routers
from .layer_quantizer import HessianCache, experts_hessians, quantize_experts, quantize_linear
from .linear_sites import (classify_linears, get_weight, quantizable_linears, require_unpermuted,
                           set_weight)

log = logging.getLogger(__name__)


class SequentialTernarize(Pass):
    def __init__(self, batches: List[Tuple[tuple, dict]], config: Optional[CompileConfig] = None,
                 quantize_fn: Callable = quantize_linear, progress: bool = True):
        if not batches:
            raise ValueError("SequentialTernarize needs at least one calibration batch")
        self.batches = batches
        self.config = config or CompileConfig()
        self.quantize_fn = quantize_fn
        self.progress = progress
        self.fqns: List[str] = []

    def requires(self, gm: fx.GraphModule) -> None:
        require_captured(gm, self.name)
        require_unpermuted(gm, self.name)
        # silent: call() logs the exclusions
        skip = skip_with_routers(gm, self.config)
        if not classify_linears(gm, skip)[0] and not classify_experts(gm, skip)[0]:
            raise ValueError("the graph has no quantizable Linear nodes (are they all skipped?)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        skip = skip_with_routers(gm, self.config)
        sites = quantizable_linears(gm, skip)
        experts = quantizable_experts(gm, skip)
        by_node = {node: fqn for fqn, node in [*sites.items(), *experts.items()]}
        runner = BatchedGraphRunner(gm, self.batches, targets=[*sites.values(), *experts.values()],
                                    offload_to="cpu" if self.config.offload_activations else None)
        hessians = HessianCache(sites)  # experts take per-expert Hessians of their own inputs
        store = store_of(gm)
        segments = runner.segments()
        # Two bars: stages (decoder blocks) show where the calibration forward is, layers show
        # the quantizer's progress (most of the time is spent there).
        bar = tqdm(segments, desc="stages", unit="stage", disable=not self.progress)
        self._layer_bar = tqdm(total=len(by_node), desc="ternarize", unit="layer",
                               disable=not self.progress)
        with torch.no_grad(), bar, self._layer_bar:
            for stage, nodes in bar:
                bar.set_postfix_str(stage)
                stage_sites = [n for n in nodes if n in by_node]
                if self.config.sequential == "stage" and stage_sites:
                    self._run_stage_twice(runner, nodes, stage_sites, by_node, hessians, store)
                    continue
                for node in nodes:
                    if node in by_node:
                        self._quantize(runner, node, by_node[node], hessians, store)
                    runner.run_node(node)
        for fqn in by_node.values():
            set_weight(gm, fqn, runner.weights[fqn])
        self.fqns = list(by_node.values())
        self.peak_activation_bytes = runner.peak_bytes
        store.config["peak_activation_bytes"] = runner.peak_bytes
        log.info("calibration activations: peak %.1f MiB held at once (%s)", runner.peak_bytes / 2**20,
                 "offloaded to the CPU" if runner.offload_to is not None else "on the model's device")
        return PassResult(gm, modified=True)

    def _run_stage_twice(self, runner, nodes, stage_sites, by_node, hessians, store) -> None:
        """Full-precision pass to collect this stage's Hessians, quantize, re-run quantized."""
        snapshot = runner.pin(dict(runner.env))  # pinned: counted in the runner's peak bytes
        inputs = runner.pin({})
        for node in nodes:
            if node in by_node:
                for arg in calibration_inputs(node):
                    inputs[arg] = runner.value(arg)
            runner.run_node(node)
        for node in stage_sites:
            self._quantize(runner, node, by_node[node], hessians, store,
                           [_per_batch(inputs[arg]) for arg in calibration_inputs(node)])
        runner.unpin(inputs)
        runner.unpin(snapshot)
        runner.env = snapshot
        for node in nodes:
            runner.run_node(node)

    def _quantize(self, runner, node, fqn, hessians, store, activations=None) -> None:
        if activations is None:
            activations = [_per_batch(runner.value(arg)) for arg in calibration_inputs(node)]
        W = get_weight(runner.gm, fqn)
        self._layer_bar.set_postfix_str(fqn, refresh=False)
        if node.target is LINEAR_OP:  # activations may be offloaded: H goes to W's device
            H = hessians.take(fqn, node, activations[0], device=W.device)
            layer, Q = self.quantize_fn(fqn, W, H, self.config.ternary)
        else:
            Hs = experts_hessians(fqn, activations, W)
            layer, Q = quantize_experts(fqn, W, Hs, self.config.ternary, self.quantize_fn)
        store[fqn] = layer
        runner.weights[fqn] = Q
        self._layer_bar.update(1)


def _per_batch(value) -> List[torch.Tensor]:
    if not isinstance(value, PerBatch):
        raise TypeError("a Linear input does not depend on the calibration data")
    return value.values
