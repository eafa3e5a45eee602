"""Registration of ``torch.ops.pt2pass.ternary_experts``: stacked MoE experts with ternary weights.

``ternary_experts(x, offs, packed, alpha, mu, perm, block_size)`` replaces transformers' grouped
matmul ``grouped_mm(x, W.transpose(-2, -1), offs)`` over experts W (E, N, K) (see
``pt2pass/experts.py``): x (S, K) holds the rows sorted by expert, rows ``offs[e-1]:offs[e]`` go
through expert e (``packed[e]``, ``alpha[e]``, ``mu[e]``, ``perm[e]``, each as in ternary_linear),
rows past ``offs[-1]`` come out zero.

Like ternary_linear it is a ``triton_op`` (the CUDA body launches the grouped Triton GEMM through
``wrap_triton``, which reads ``offs`` on the device: no host sync, so CUDA graphs can capture it).
The CPU body loops over the experts, which needs ``offs`` on the host: that loop is a
``custom_op`` of its own (``ternary_experts_loop``) so that tracing (torch.compile on CPU) sees one
opaque call instead of data-dependent Python.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import custom_op, triton_op

from .format import DEFAULT_BLOCK_SIZE, WEIGHTS_PER_WORD, n_blocks
from .reference import ternary_experts_reference

EXPERTS_OP_NAME = "pt2pass::ternary_experts"
LOOP_OP_NAME = "pt2pass::ternary_experts_loop"


def check_experts_args(x, offs, packed, alpha, mu, perm, block_size) -> None:
    torch._check(x.dim() == 2, lambda: f"ternary_experts: x must be (rows, in_features), got {x.dim()}-D")
    torch._check(packed.dim() == 3 and packed.dtype == torch.int32,
                 lambda: "ternary_experts: packed must be a 3-D int32 tensor (experts, out, in / 16)")
    k = x.shape[-1]
    torch._check(packed.shape[2] * WEIGHTS_PER_WORD == k,
                 lambda: f"ternary_experts: x has {k} features but packed holds {packed.shape[2] * WEIGHTS_PER_WORD}")
    torch._check(offs.dim() == 1 and offs.shape[0] == packed.shape[0]
                 and offs.dtype in (torch.int32, torch.int64),
                 lambda: "ternary_experts: offs must be one int32/int64 cumulative row count per expert")
    torch._check(block_size > 0 and block_size % WEIGHTS_PER_WORD == 0,
                 lambda: f"ternary_experts: block_size={block_size} must be a positive multiple of 16")
    torch._check(alpha.shape == mu.shape and alpha.dim() == 3 and alpha.shape[:2] == packed.shape[:2]
                 and alpha.shape[2] == n_blocks(k, block_size),
                 lambda: "ternary_experts: alpha and mu must be (experts, out_features, ceil(K / block_size))")
    if perm is not None:
        torch._check(perm.shape == (packed.shape[0], k),
                     lambda: "ternary_experts: perm must be (experts, in_features)")


# cudagraph_unsafe: the loop reads offs on the host, which a CUDA graph capture forbids; Inductor
# then runs it outside the graph (the GPU uses it only for shapes the grouped kernel does not take).
_UNSAFE = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


@custom_op(LOOP_OP_NAME, mutates_args=(), tags=_UNSAFE)
def ternary_experts_loop(x: torch.Tensor, offs: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor,
                         mu: torch.Tensor, perm: Optional[torch.Tensor] = None,
                         block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """ternary_experts one expert at a time (reference.ternary_experts_reference)."""
    return ternary_experts_reference(x, offs, packed, alpha, mu, perm, block_size)


@ternary_experts_loop.register_fake
def _fake_loop(x, offs, packed, alpha, mu, perm=None, block_size=DEFAULT_BLOCK_SIZE):
    return x.new_empty((x.shape[0], packed.shape[1]))


@triton_op(EXPERTS_OP_NAME, mutates_args=())
def ternary_experts(x: torch.Tensor, offs: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor,
                    mu: torch.Tensor, perm: Optional[torch.Tensor] = None,
                    block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Stacked ternary experts over rows sorted by expert (module doc). ``offs`` must be
    non-decreasing and at most the row count; on the GPU it is not checked (a device sync)."""
    check_experts_args(x, offs, packed, alpha, mu, perm, block_size)
    if x.device.type == "cpu":
        return torch.ops.pt2pass.ternary_experts_loop(x, offs, packed, alpha, mu, perm, block_size)
    from .kernels.experts import ternary_experts_triton  # imports triton only when needed

    return ternary_experts_triton(x, offs, packed, alpha, mu, perm, block_size)


@ternary_experts.register_fake
def _fake(x, offs, packed, alpha, mu, perm=None, block_size=DEFAULT_BLOCK_SIZE):
    check_experts_args(x, offs, packed, alpha, mu, perm, block_size)
    return x.new_empty((x.shape[0], packed.shape[1]))
