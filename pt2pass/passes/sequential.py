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

from ..config import CompileConfig
from ..pass_manager import Pass, PassResult
from ..runner import BatchedGraphRunner, PerBatch
from ..store import store_of
from .layer_quantizer import HessianCache, quantize_linear
from .linear_sites import get_weight, quantizable_linears, set_weight

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
        if not quantizable_linears(gm, self.config.skip):
            raise ValueError("the graph has no quantizable Linear nodes (are they all skipped?)")

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = quantizable_linears(gm, self.config.skip)
        by_node = {node: fqn for fqn, node in sites.items()}
        runner = BatchedGraphRunner(gm, self.batches, targets=sites.values())
        hessians = HessianCache(sites)
        store = store_of(gm)
        segments = runner.segments()
        bar = tqdm(segments, desc="ternarize", unit="stage", disable=not self.progress)
        with torch.no_grad():
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
        for fqn in sites:
            set_weight(gm, fqn, runner.weights[fqn])
        self.fqns = list(sites)
        return PassResult(gm, modified=True)

    def _run_stage_twice(self, runner, nodes, stage_sites, by_node, hessians, store) -> None:
        """Full-precision pass to collect this stage's Hessians, quantize, re-run quantized."""
        snapshot = dict(runner.env)
        activations = {}
        for node in nodes:
            if node in by_node:
                activations[node] = _per_batch(runner.value(node.args[0]))
            runner.run_node(node)
        for node in stage_sites:
            self._quantize(runner, node, by_node[node], hessians, store, activations[node])
        runner.env = snapshot
        for node in nodes:
            runner.run_node(node)

    def _quantize(self, runner, node, fqn, hessians, store, activations=None) -> None:
        if activations is None:
            activations = _per_batch(runner.value(node.args[0]))
        H = hessians.take(fqn, node, activations)
        W = get_weight(runner.gm, fqn)
        layer, Q = self.quantize_fn(fqn, W, H, self.config.ternary)
        store[fqn] = layer
        runner.weights[fqn] = Q


def _per_batch(value) -> List[torch.Tensor]:
    if not isinstance(value, PerBatch):
        raise TypeError("a Linear input does not depend on the calibration data")
    return value.values
