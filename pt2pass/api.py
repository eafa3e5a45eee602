"""The public entry points: ``compile`` and ``export``. Short functions that wire the parts."""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .capture import capture, is_hf_causal_lm
from .config import CompileConfig
from .data import calibration_tensor
from .lowering.lower import LowerTernaryLinear
from .pass_manager import Pass, PassManager
from .passes import FoldPermutations, InsertPermutations, SequentialTernarize, TernarizeWeights
from .quantized_model import QuantizedCausalLM, QuantizedModel
from .runner import causal_lm_batches
from .store import store_of

log = logging.getLogger(__name__)


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError(f"{type(model).__name__} has no parameters") from None


def calibration_batches(model: nn.Module, calib_data, tokenizer, config: CompileConfig
                        ) -> List[Tuple[tuple, dict]]:
    """Turn any accepted ``calib_data`` into batches of graph inputs on the model's device."""
    device = _device_of(model)
    if is_hf_causal_lm(model):
        ids = calibration_tensor(calib_data, tokenizer, seqlen=config.seqlen,
                                 n_samples=config.n_samples, seed=config.seed,
                                 vocab_size=getattr(model.config, "vocab_size", None))
        return causal_lm_batches(ids, config.batch_size, device)
    # Any other module: calib_data is a tensor of inputs (first dim = samples) or a list of them.
    if isinstance(calib_data, torch.Tensor):
        calib_data = list(calib_data.split(config.batch_size))
    if not isinstance(calib_data, (list, tuple)) or not calib_data:
        raise ValueError("calibration data for a non-LM module must be a non-empty tensor or list of "
                         "input tensors")
    for i, x in enumerate(calib_data):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration input {i} is a {type(x).__name__}, not a tensor")
        if x.device != device:
            raise ValueError(f"calibration input {i} is on {x.device} but the model is on {device}")
    return [((x,), {}) for x in calib_data]


def default_passes(batches, config: CompileConfig, progress: bool = True) -> List[Pass]:
    """The standard pipeline: sequential calibration + ternarization, SSR permutations made explicit
    and folded into producers where legal, then lowering (remaining private gathers fuse into the op)."""
    if config.ternary.needs_calibration:
        quantize: Pass = SequentialTernarize(batches, config, progress=progress)
    else:
        quantize = TernarizeWeights(config, progress=progress)
    return [quantize, InsertPermutations(), FoldPermutations(), LowerTernaryLinear()]


def compile(model: nn.Module, calib_data=None, tokenizer=None, config: Optional[CompileConfig] = None,
            *, example_inputs=None, passes: Optional[Sequence[Pass]] = None,
            progress: bool = True) -> QuantizedModel:
    """Ternarize ``model`` with PT²-LLM and lower its Linears to ``pt2pass::ternary_linear``.

    ``calib_data``: token tensor (n, seqlen), list of token tensors, list of strings (with
    ``tokenizer``), a local text/JSON/parquet file or folder, or a ``datasets.Dataset``. The model
    itself is not modified. Returns a :class:`QuantizedModel` called like the model.
    """
    config = config or CompileConfig()
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers: nothing to ternarize")
    was_training = model.training
    model.eval()
    try:
        batches = []
        if calib_data is not None:
            batches = calibration_batches(model, calib_data, tokenizer, config)
        elif config.ternary.needs_calibration:
            raise ValueError(f"method {config.ternary.method!r} needs calibration data (calib_data)")
        gm = capture(model, example_inputs)
        store = store_of(gm)
        store.config.update({"ternary": vars(config.ternary), "seqlen": config.seqlen,
                             "n_calibration_sequences": sum(_rows(b) for b in batches)})
        manager = PassManager(list(passes) if passes is not None
                              else default_passes(batches, config, progress))
        gm = manager(gm)
    finally:
        model.train(was_training)
    cls = QuantizedCausalLM if is_hf_causal_lm(model) else QuantizedModel
    return cls(gm, store, model_config=getattr(model, "config", None), pass_history=manager.history)


def _rows(batch) -> int:
    args, kwargs = batch
    x = kwargs.get("input_ids", args[0] if args else None)
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else 0


def export(qm: QuantizedModel, example_inputs=None) -> torch.export.ExportedProgram:
    """``torch.export`` the compiled model (dynamic batch and sequence length for causal LMs)."""
    if example_inputs is None:
        if not qm.causal_lm:
            raise ValueError("example_inputs are required to export a non-LM module")
        example_inputs = (torch.zeros(2, 16, dtype=torch.long, device=_device_of(qm)),)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    dims = tuple({d: torch.export.Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor)
                 else None for x in example_inputs)
    with torch.no_grad():
        return torch.export.export(qm, tuple(example_inputs), dynamic_shapes=dims, strict=False)
