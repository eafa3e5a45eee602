"""Quantization store + model skeleton -> lowered QuantizedModel, without calibration.

``pt2pass.compile`` calibrates and fills the store, then lowers; ``pt2pass.load`` reads the store
from a checkpoint and only lowers. Both end here: the store holds *pre-fold* results keyed by
weight FQN and FoldPermutations only annotates nodes, so re-running InsertPermutations,
FoldPermutations and LowerTernaryLinear on a fresh capture rebuilds exactly the same graph.

The skeleton's quantized Linear weights are never read: they may live on the meta device (a
model built from its config costs no full-precision weights). torch.export cannot trace a meta
weight next to real activations, so during capture each one is stood in for by a broadcast
zero of the right shape (a single element of storage), and after capture the graph's copy is set
back to meta (ternary layers, replaced by lowering) or to the dequantized weight (GPTQ layers,
which stay dense ``aten.linear``).
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .capture import capture, is_hf_causal_lm
from .lowering.lower import LowerTernaryLinear
from .pass_manager import Pass, PassManager
from .passes import FoldPermutations, InsertPermutations
from .passes.linear_sites import set_weight
from .quantized_model import QuantizedCausalLM, QuantizedModel
from .store import STORE_KEY, LayerQuant, QuantStore

log = logging.getLogger(__name__)


def lowering_passes(allow_empty: bool = False) -> List[Pass]:
    """Everything after quantization: SSR permutations made explicit, folded into producers where
    legal, then Linears lowered to ``pt2pass::ternary_linear`` (remaining gathers fuse in).
    ``allow_empty``: an empty store lowers nothing instead of being refused."""
    return [InsertPermutations(), FoldPermutations(), LowerTernaryLinear(allow_empty=allow_empty)]


def wrap(gm: fx.GraphModule, store: QuantStore, model: nn.Module, *, model_config=None,
         pass_history: Optional[list] = None) -> QuantizedModel:
    """The QuantizedModel that matches ``model``: a QuantizedCausalLM for HF causal LMs, which
    keeps ``model`` as its skeleton to capture decode graphs from (its quantized Linear weights
    may be on the meta device)."""
    if model_config is None:
        model_config = getattr(model, "config", None)
    if is_hf_causal_lm(model):
        return QuantizedCausalLM(gm, store, model_config=model_config, pass_history=pass_history,
                                 skeleton=model)
    return QuantizedModel(gm, store, model_config=model_config, pass_history=pass_history)


def assemble(model: nn.Module, store: QuantStore, *, example_inputs=None,
             model_config=None) -> QuantizedModel:
    """Lower ``model`` with the quantization results in ``store`` (no calibration).

    ``model`` must hold every tensor that is not a quantized Linear weight; the quantized weights
    (the store's FQNs) are not read and may be on the meta device. The model is not modified.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    for fqn, layer in store.layers.items():
        if fqn not in params:
            raise ValueError(f"quantized layer {fqn} is not a parameter of {type(model).__name__}")
        if tuple(params[fqn].shape) != layer.shape:
            raise ValueError(f"{fqn}: the model's weight is {tuple(params[fqn].shape)} but the "
                             f"quantized layer is {layer.shape}")
    device = real_device(model)
    was_training = model.training
    model.eval()
    try:
        with traceable_weights(model, store, device):
            gm = capture(model, example_inputs)
    finally:
        model.train(was_training)
    gm, manager = lower_from_store(gm, store, params, device)
    log.info("assembled %s: %d quantized layers", type(model).__name__, len(store))
    return wrap(gm, store, model, model_config=model_config, pass_history=manager.history)


def lower_from_store(gm: fx.GraphModule, store: QuantStore, params: Dict[str, torch.Tensor],
                     device: torch.device) -> Tuple[fx.GraphModule, PassManager]:
    """Attach ``store`` to a graph captured under :func:`traceable_weights`, give it the weights
    the passes expect (:func:`graph_weight`, dtype from ``params``) and run the lowering passes.
    Shared by :func:`assemble` and the decode-graph capture (``decode.build_decode_graph``)."""
    gm.meta[STORE_KEY] = store
    for fqn, layer in store.layers.items():
        set_weight(gm, fqn, graph_weight(layer, params[fqn].dtype, device))
    # empty for a decode graph of an unquantized model (the bf16 baselines of the benchmarks)
    manager = PassManager(lowering_passes(allow_empty=True))
    return manager(gm), manager


def real_device(model: nn.Module) -> torch.device:
    """The device of the model's materialised tensors (all of them must agree)."""
    devices = {t.device for t in itertools.chain(model.parameters(), model.buffers())
               if t.device.type != "meta"}
    if len(devices) != 1:
        raise ValueError(f"{type(model).__name__} must have its non-quantized tensors on one "
                         f"device, found {sorted(map(str, devices)) or 'only meta tensors'}")
    return devices.pop()


@contextlib.contextmanager
def traceable_weights(model: nn.Module, store: QuantStore, device: torch.device) -> Iterator[None]:
    """Stand in a broadcast zero on ``device`` for each meta quantized weight while tracing.

    Stacked MoE experts (E, N, K) get zeros broadcast over the experts only, (0, K, 1) strides over
    one shared (N, K) buffer: torch's grouped matmul (bf16) refuses a weight without a unit stride
    and a row stride covering its rows (a stride-0 matrix)."""
    swapped: Dict[str, nn.Parameter] = {}
    shared: Dict[torch.dtype, torch.Tensor] = {}
    sizes = [model.get_parameter(f).shape[-2:].numel() for f in store.layers if store[f].is_experts]
    for fqn in store.layers:
        owner, attr = _owner(model, fqn)
        weight = owner._parameters[attr]
        if weight.device.type == "meta":
            swapped[fqn] = weight
            if weight.dim() == 3:
                if weight.dtype not in shared:
                    shared[weight.dtype] = torch.zeros(max(sizes), dtype=weight.dtype, device=device)
                stand_in = shared[weight.dtype].as_strided(weight.shape, (0, weight.shape[2], 1))
            else:
                stand_in = torch.zeros((), dtype=weight.dtype, device=device).expand(weight.shape)
            owner._parameters[attr] = nn.Parameter(stand_in, requires_grad=False)
    try:
        yield
    finally:
        for fqn, weight in swapped.items():
            owner, attr = _owner(model, fqn)
            owner._parameters[attr] = weight


def graph_weight(layer: LayerQuant, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """What the graph holds for a quantized weight before lowering: nothing real for ternary
    layers (lowering replaces them from the store), the dequantized weight for the others."""
    if layer.is_ternary:
        return torch.empty(layer.shape, dtype=dtype, device="meta")
    return layer.dequantized(dtype).to(device=device)


def _owner(model: nn.Module, fqn: str):
    prefix, _, attr = fqn.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), attr
