"""Plain-torch ternary_linear: the CPU path of the custom op and the oracle for the kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .format import DEFAULT_BLOCK_SIZE, dequantize


def ternary_linear_reference(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor,
                             mu: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             perm: Optional[torch.Tensor] = None,
                             block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """y = x[..., perm] @ (alpha * T + mu).T + bias, computed in x's dtype."""
    if perm is not None:
        x = x.index_select(-1, perm)
    w = dequantize(packed, alpha, mu, block_size, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def rms_norm_reference(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm as transformers computes it: statistics in float32, the normalized h rounded
    to h's dtype, then times the weight (the op sequence FuseAddRMSNorm matches, so on CPU the
    fused op gives the unfused graph's values to the bit)."""
    hf = h.to(torch.float32)
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype)


def ternary_experts_reference(x: torch.Tensor, offs: torch.Tensor, packed: torch.Tensor,
                              alpha: torch.Tensor, mu: torch.Tensor, perm: Optional[torch.Tensor] = None,
                              block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of x (S, K) through expert e's ternary weight (``packed[e]`` ...),
    rows past ``offs[-1]`` zero: transformers' grouped matmul over experts, one expert at a time."""
    out = x.new_zeros((x.shape[0], packed.shape[1]))
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = ternary_linear_reference(x[start:end], packed[e], alpha[e], mu[e], None,
                                                      None if perm is None else perm[e], block_size)
        start = max(start, end)
    return out
