"""Registration of ``torch.ops.pt2pass.ternary_linear`` (and ``ternary_linear_group``,
``attention``) with torch.library.

The op is a ``triton_op``: on CUDA its body launches the Triton kernels through ``wrap_triton``
(so torch.compile sees and inlines the kernel, no graph break); on CPU it runs the plain-torch
reference. The branch on the device must stay in the body: a body that only launches the kernel
fails under export/AOTInductor on CPU. The fake implementation gives shapes to tracing.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch
from torch.library import triton_op

from .format import DEFAULT_BLOCK_SIZE, WEIGHTS_PER_WORD, n_blocks
from .reference import rms_norm_reference, ternary_linear_reference

log = logging.getLogger(__name__)

OP_NAME = "pt2pass::ternary_linear"
GROUP_OP_NAME = "pt2pass::ternary_linear_group"
ADD_NORM_GROUP_OP_NAME = "pt2pass::add_rms_norm_linear_group"
ATTENTION_OP_NAME = "pt2pass::attention"


def _check_args(x, packed, alpha, mu, bias, perm, block_size) -> None:
    k = x.shape[-1]
    torch._check(packed.dim() == 2 and packed.dtype == torch.int32,
                 lambda: "ternary_linear: packed must be a 2-D int32 tensor")
    torch._check(packed.shape[1] * WEIGHTS_PER_WORD == k,
                 lambda: f"ternary_linear: x has {k} features but packed holds "
                         f"{packed.shape[1] * WEIGHTS_PER_WORD}")
    torch._check(block_size > 0 and block_size % WEIGHTS_PER_WORD == 0,
                 lambda: f"ternary_linear: block_size={block_size} must be a positive multiple of 16")
    torch._check(alpha.dim() == 2 and alpha.shape == mu.shape and alpha.shape[0] == packed.shape[0]
                 and alpha.shape[1] == n_blocks(k, block_size),
                 lambda: "ternary_linear: alpha and mu must be (out_features, ceil(K / block_size))")
    if bias is not None:
        torch._check(bias.shape == (packed.shape[0],), lambda: "ternary_linear: bad bias shape")
    if perm is not None:
        torch._check(perm.shape == (k,), lambda: "ternary_linear: perm must have in_features entries")


@triton_op(OP_NAME, mutates_args=())
def ternary_linear(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                   bias: Optional[torch.Tensor] = None,
                   perm: Optional[torch.Tensor] = None,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """y = x[..., perm] @ (alpha * T + mu).T + bias for a packed ternary weight (see format.py).

    ``perm`` must be a permutation of 0..K-1: its values are not checked on the GPU (that would
    cost a device sync per call), where an index out of range reads out of bounds."""
    _check_args(x, packed, alpha, mu, bias, perm, block_size)
    if x.device.type == "cpu":
        return ternary_linear_reference(x, packed, alpha, mu, bias, perm, block_size)
    from .kernels.dispatch import ternary_linear_triton  # imports triton only when needed

    return ternary_linear_triton(x, packed, alpha, mu, bias, perm, block_size)


def _fake(x, packed, alpha, mu, bias=None, perm=None, block_size=DEFAULT_BLOCK_SIZE):
    _check_args(x, packed, alpha, mu, bias, perm, block_size)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


ternary_linear.register_fake(_fake)


def _check_group(x, packed, alpha, mu, bias, perm, block_size) -> None:
    torch._check(len(packed) >= 1 and len(packed) == len(alpha) == len(mu) == len(bias) == len(perm),
                 lambda: "ternary_linear_group: packed, alpha, mu, bias and perm must be lists of "
                         "one entry per member")
    for member in zip(packed, alpha, mu, bias, perm):
        _check_args(x, *member, block_size)


@triton_op(GROUP_OP_NAME, mutates_args=())
def ternary_linear_group(x: torch.Tensor, packed: List[torch.Tensor], alpha: List[torch.Tensor],
                         mu: List[torch.Tensor], bias: List[Optional[torch.Tensor]],
                         perm: List[Optional[torch.Tensor]],
                         block_size: int = DEFAULT_BLOCK_SIZE) -> List[torch.Tensor]:
    """[ternary_linear(x, packed[i], alpha[i], mu[i], bias[i], perm[i])] for Linears that read the
    same x (q/k/v, gate/up): on the GPU one kernel launch for all of them at batch 1
    (kernels/gemv_group.py), the same results as the separate ops up to float32 summation order."""
    _check_group(x, packed, alpha, mu, bias, perm, block_size)
    if x.device.type == "cpu":
        return [ternary_linear_reference(x, *member, block_size) for member in zip(packed, alpha, mu, bias, perm)]
    from .kernels.dispatch import ternary_linear_group_triton

    return ternary_linear_group_triton(x, packed, alpha, mu, bias, perm, block_size)


def _fake_group(x, packed, alpha, mu, bias, perm, block_size=DEFAULT_BLOCK_SIZE):
    _check_group(x, packed, alpha, mu, bias, perm, block_size)
    return [x.new_empty((*x.shape[:-1], p.shape[0])) for p in packed]


ternary_linear_group.register_fake(_fake_group)


def _check_add_norm(a, b, norm_weight, packed, alpha, mu, bias, perm, block_size) -> None:
    torch._check(b.shape == a.shape and b.dtype == a.dtype,
                 lambda: f"add_rms_norm_linear_group: b must have a's shape and dtype, got {tuple(b.shape)} "
                         f"{b.dtype} against {tuple(a.shape)} {a.dtype}")
    torch._check(norm_weight.shape == (a.shape[-1],),
                 lambda: f"add_rms_norm_linear_group: norm_weight must have {a.shape[-1]} entries")
    _check_group(a, packed, alpha, mu, bias, perm, block_size)


@triton_op(ADD_NORM_GROUP_OP_NAME, mutates_args=())
def add_rms_norm_linear_group(a: torch.Tensor, b: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                              packed: List[torch.Tensor], alpha: List[torch.Tensor], mu: List[torch.Tensor],
                              bias: List[Optional[torch.Tensor]], perm: List[Optional[torch.Tensor]],
                              block_size: int = DEFAULT_BLOCK_SIZE) -> List[torch.Tensor]:
    """[h, *ternary_linear_group(x, packed, ...)] with h = a + b and x = LLaMA's RMSNorm of h
    (reference.rms_norm_reference): a decoder layer's residual add, norm and q/k/v or gate/up, as
    FuseAddRMSNorm rewrites them. On the GPU at batch 1 the add and the norm run inside the grouped
    GEMV's x quantization (kernels/norm_group.py: no launch of their own, x's roundings to bf16 /
    fp16 skipped); on CPU, the unfused computation exactly."""
    _check_add_norm(a, b, norm_weight, packed, alpha, mu, bias, perm, block_size)
    if a.device.type == "cpu":
        h = a + b
        x = rms_norm_reference(h, norm_weight, eps)
        return [h, *[ternary_linear_reference(x, *member, block_size) for member in zip(packed, alpha, mu, bias, perm)]]
    from .kernels.dispatch import add_rms_norm_group_triton

    return add_rms_norm_group_triton(a, b, norm_weight, eps, packed, alpha, mu, bias, perm, block_size)


def _fake_add_norm(a, b, norm_weight, eps, packed, alpha, mu, bias, perm, block_size=DEFAULT_BLOCK_SIZE):
    _check_add_norm(a, b, norm_weight, packed, alpha, mu, bias, perm, block_size)
    x_dtype = torch.promote_types(norm_weight.dtype, a.dtype)  # weight * normalized h
    return [a.new_empty(a.shape), *[a.new_empty((*a.shape[:-1], p.shape[0]), dtype=x_dtype) for p in packed]]


add_rms_norm_linear_group.register_fake(_fake_add_norm)


@triton_op(ATTENTION_OP_NAME, mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, scale=scale, enable_gqa=enable_gqa)``
    (no dropout, not causal); on the GPU a single query position over a KV cache runs the
    split-cache decode kernel (kernels/decode_attention.py), which skips the blocks the mask hides."""
    if q.device.type == "cuda" and q.shape[2] == 1 and (enable_gqa or k.shape[1] == q.shape[1]):
        from .kernels.decode_attention import decode_attention, unsupported_reason
        from .kernels.dispatch import _num_sms

        if unsupported_reason(q, k, v, attn_mask) is None:
            return decode_attention(q, k, v, attn_mask, q.shape[-1] ** -0.5 if scale is None else scale,
                                    sms=_num_sms(q.device))
    if enable_gqa and k.shape[1] != q.shape[1]:  # KV heads repeated as HF's repeat_kv does: same values
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    # contiguous, as the fake says: CUDA's SDPA kernels may return a transposed layout, and
    # export / AOTInductor plan memory from the fake's strides (a no-op on CPU)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale).contiguous()


def _fake_attention(q, k, v, attn_mask=None, scale=None, enable_gqa=False):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


attention.register_fake(_fake_attention)


def compile_fresh(fn, **compile_kwargs):
    """``torch.compile(fn, **compile_kwargs)`` after turning torch's AOTAutograd cache off for
    this process, so that compilations trace the pt2pass ops' bodies anew.

    That cache keys a graph by the ops it calls, not by what a custom op's body does
    (pytorch/pytorch#160472), and it lives on disk: a graph compiled before an upgrade of pt2pass,
    or under other ``PT2PASS_TMA`` / ``PT2PASS_AUTOTUNE`` / ``PT2PASS_DECODE_ATTENTION`` settings,
    would come back with the old kernel choices (session 10 found a same-process A/B of a setting
    silently comparing it with itself). Process-wide, because a compilation can happen at any call
    (a guard failure) and switching the setting around every call costs 20-100 us of host time
    per decode step; it only costs compile time. Inductor's own cache, keyed after tracing (kernel
    sources included), stays on. ``TORCHINDUCTOR_AUTOGRAD_CACHE=0`` does the same for models you
    compile yourself."""
    import torch._functorch.config as functorch_config

    if functorch_config.enable_autograd_cache:
        log.info("pt2pass: torch's AOTAutograd cache turned off for this process (it would replay stale "
                 "traces of pt2pass ops)")
        functorch_config.enable_autograd_cache = False
    return torch.compile(fn, **compile_kwargs)


from . import experts_ops  # noqa: E402,F401  (registers torch.ops.pt2pass.ternary_experts)
