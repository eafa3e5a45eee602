"""pt2pass: post-training ternarization (PT²-LLM) as a PyTorch 2 compiler pass pipeline.

    qm = pt2pass.compile(model, calib_data, tokenizer)   # ternarize + lower
    logits = qm(input_ids).logits
    ep = pt2pass.export(qm)                               # ExportedProgram with pt2pass ops
    pt2pass.save(qm, "ckpt"); qm = pt2pass.load("ckpt")   # safetensors checkpoint, no calibration
"""
from . import lowering  # noqa: F401  (registers torch.ops.pt2pass.ternary_linear)
from . import _hf_pytrees  # noqa: F401  (lets torch.export.load rebuild HF model outputs)
from .api import compile, export
from .capture import capture
from .checkpoint import CheckpointError, load, save
from .config import CompileConfig, TernaryConfig
from .lowering.lower import LowerTernaryLinear
from .pass_manager import Pass, PassError, PassManager, PassResult
from .passes import (CaptureCalibration, FoldPermutations, InsertPermutations, SequentialTernarize,
                     TernarizeWeights)
from .quantized_model import QuantizedModel
from .store import QuantStore, store_of

__all__ = [
    "compile", "export", "save", "load", "CheckpointError", "capture", "CompileConfig",
    "TernaryConfig", "Pass", "PassError", "PassManager", "PassResult", "CaptureCalibration", "SequentialTernarize", "TernarizeWeights",
    "InsertPermutations", "FoldPermutations",
    "LowerTernaryLinear", "QuantizedModel", "QuantStore", "store_of",
]
