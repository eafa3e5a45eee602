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
