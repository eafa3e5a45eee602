"""Pure math of PT²-LLM ternarization (no torch.fx): the ternary quantizer (ATQ, ITF, AGA), SSR
column ordering, Hessian accumulation, the GPTQ-style blockwise loop and the baselines."""
from .baselines import gptq_quantize, minmax_params, rtn_ternary
from .gptq import obs_update, ternarize_weight
from .hessian import HessianAccumulator, cholesky_inverse_damped, GroupedHessians, prepare_hessian
from .result import QuantResult, dequantize_blocks, n_blocks, unpermute
from .ssr import cosine_to_mean, next_block, static_order
from .ternary import (ItfResult, aga, atq_init, canonicalize, dequant, fit_grid, itf,
                      output_error, round_to_grid, weight_error)

__all__ = [
    "HessianAccumulator", "ItfResult", "QuantResult", "aga", "atq_init", "canonicalize",
    "cholesky_inverse_damped", "cosine_to_mean", "dequant", "dequantize_blocks",
    "fit_grid", "gptq_quantize", "GroupedHessians", "itf", "minmax_params", "n_blocks",
    "next_block", "obs_update", "output_error", "prepare_hessian", "round_to_grid",
    "rtn_ternary", "static_order", "ternarize_weight", "unpermute", "weight_error",
]
