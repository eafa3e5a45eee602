"""ternary_linear on the GPU: pick the kernel by M, handle 3-D x, permutation, bias and split-K.

Paths (M = number of rows of x once flattened):
- bf16/fp16 x, M = 1: :func:`ternary_gemv_dp2a` (x quantized to int16 once per call by a small
  kernel, integer dp2a arithmetic, dp2a.py) from DP2A_MIN_WEIGHTS weights, below that
  :func:`ternary_gemv_half2` (half2 arithmetic, x prepared in every program: no extra launch);
  M = 3-8, and M = 2 or 9-16 from DP2A_MIN_WEIGHTS: :func:`ternary_gemv_imma` (int16 x, integer
  tensor-core MMA on register fragments, imma.py); the other M = 2: :func:`ternary_gemv_packed`
  (half2, x prepacked once, each word decoded once for both rows); float32 x, M <= GEMV_MAX_M:
  :func:`ternary_gemv` (CUDA cores). Permutation gathered in the kernels (or their x quantize
  kernels), K split over programs when N is small.
- M >= DEQUANT_MIN_M (prefill): the weight is dequantized once per call to x's dtype by a Triton
  kernel (N*K*2 bytes written) and multiplied by cuBLAS: at these sizes the product is compute
  bound and cuBLAS's matrix-unit efficiency beats the fused kernel (see docs/results.md).
- otherwise: :func:`ternary_gemm` (tensor cores, the MMA operands swapped or not, autotuned).
  Up to GATHER_MAX_M rows the permutation is gathered in the kernel (x is tiny and cached);
  above, x is permuted once with index_select (an in-kernel gather of a large x would read every
  x sector up to 16 times). Small M splits K.
Everything launches through torch.library.wrap_triton, so torch.compile and export trace it.

Shapes the kernels do not cover (block_size != 128, K not a multiple of 128, e.g. SmolLM2's 576,
or other dtypes) run the plain-torch reference on the GPU instead, with a one-time log message.
"""
from __future__ import annotations

import functools
import logging
from typing import List, Optional

import torch

from ..reference import rms_norm_reference, ternary_linear_reference
from .common import BLOCK
from .gemm import SMALL_M_MAX, gemm_split, ternary_dequant, ternary_gemm
from .gemv import gemv_split, ternary_gemv
from .gemv_dp2a import ternary_gemv_dp2a
from .gemv_half2 import ternary_gemv_half2
from .gemv_imma import MAX_M as IMMA_MAX_M
from .gemv_imma import imma_split, ternary_gemv_imma
from .gemv_group import MAX_MEMBERS, members_mismatch, ternary_gemv_group
from .gemv_packed import ternary_gemv_packed
from .norm_group import ternary_gemv_group_add_norm

log = logging.getLogger(__name__)

GEMV_MAX_M = 1  # float32 x
# From this many weights gemv_dp2a (with its quantize launch) beats gemv_half2 (x prepared in every
# program) at M = 1: H200, session 7, 4096x4096 6.4 vs 6.0 us, 4096x11008 11.5 vs 12.9 us, and
# faster on the other five benchmark shapes too (docs/results.md).
DP2A_MIN_WEIGHTS = 32 << 20
# gemv_imma beats the older kernels at M = 3-8 on the four benchmark shapes timed (H200, session 9:
# 28672x8192 M = 8 114.7 -> 60.9 us, 4096x4096 12.3 -> 10.9 us); at M = 2 and 9-16 only on the
# large ones (4096x4096: gemv_packed 9.8 vs 10.5 us at M = 2, the GEMM 12.5 vs 14.2 us at M = 16).
IMMA_ANY_SIZE_M = (3, 8)
GATHER_MAX_M = 16
# From 384 rows dequantize + cuBLAS: below, the fused GEMM with swapped operands beats it (H100,
# session 14, M = 256: 28.1 vs 33.2 us on 4096x4096, 367 vs 416 on 28672x8192, faster on all 7
# shapes); at M = 2048 it runs at half of cuBLAS's tensor rate (0.43-0.52x bf16 against 0.80-0.91x).
# The crossover, from the per-row times, lies at ~250-350 rows; 384 is unmeasured. With it, M = 256
# ran at 0.58x bf16 (geomean of the 7 shapes, H100, session 15) against 0.50x dequantizing.
DEQUANT_MIN_M = 384
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter (CPU tensors): any small number
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def unsupported_reason(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor,
                       block_size: int) -> Optional[str]:
    """Why the Triton kernels cannot run this call (None when they can)."""
    k = x.shape[-1]
    if block_size != BLOCK:
        return f"block_size={block_size} (kernels need {BLOCK})"
    if k % BLOCK:
        return f"in_features={k} is not a multiple of {BLOCK}"
    if x.dtype not in _DTYPES:
        return f"activation dtype {x.dtype}"
    if alpha.dtype not in _DTYPES:
        return f"scale dtype {alpha.dtype}"
    return None


@functools.lru_cache(maxsize=64)
def _warn_fallback(reason: str) -> None:
    log.warning("pt2pass.ternary_linear: %s; running the plain-torch reference on the GPU", reason)


def small_m_kernel(m: int, n: int, k: int, dtype: torch.dtype, packed: torch.Tensor) -> Optional[str]:
    """The GEMV for m rows of x (module doc), or None for the GEMM / dequantize paths."""
    big = n * k >= DP2A_MIN_WEIGHTS
    if dtype == torch.float32:
        return "gemv" if m <= GEMV_MAX_M else None
    if m == 1:
        return "gemv_dp2a" if big else "gemv_half2"
    lo, hi = IMMA_ANY_SIZE_M
    # gemv_imma reads the words in 8-byte pairs: an odd int32 offset (a sliced buffer) cannot
    if m <= IMMA_MAX_M and packed.storage_offset() % 2 == 0 and (lo <= m <= hi or big):
        return "gemv_imma"
    return "gemv_packed" if m == 2 else None


def _dense(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def ternary_linear_triton(x: torch.Tensor, packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, perm: Optional[torch.Tensor] = None,
                          block_size: int = BLOCK) -> torch.Tensor:
    """y = x[..., perm] @ (alpha * T + mu).T + bias with the Triton kernels (see the module doc)."""
    reason = unsupported_reason(x, packed, alpha, block_size)
    if reason is not None:
        _warn_fallback(reason)
        return ternary_linear_reference(x, packed, alpha, mu, bias, perm, block_size)
    k = x.shape[-1]
    n = packed.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_empty((*lead, n))
    # the kernels index every operand with unit strides: a strided bias or perm (t[:, 0]) would be
    # read at the wrong elements, silently
    packed, alpha, mu, bias, perm = (_dense(t) for t in (packed, alpha, mu, bias, perm))
    nb = k // BLOCK
    sms = _num_sms(x.device)
    if m >= DEQUANT_MIN_M:
        if perm is not None:
            x2 = x2.index_select(1, perm)
        w = ternary_dequant(packed, alpha, mu, x.dtype)
        y = torch.addmm(bias.to(x.dtype), x2, w.t()) if bias is not None else torch.mm(x2, w.t())
        return y.reshape(*lead, n)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    gemv = small_m_kernel(m, n, k, x.dtype, packed)
    if gemv == "gemv_imma":
        ternary_gemv_imma(x2, packed, alpha, mu, bias, perm, out, split=imma_split(n, nb, sms))
    elif gemv is not None:
        launcher = {"gemv_dp2a": ternary_gemv_dp2a, "gemv_half2": ternary_gemv_half2,
                    "gemv_packed": ternary_gemv_packed, "gemv": ternary_gemv}[gemv]
        launcher(x2, packed, alpha, mu, bias, perm, out, split=gemv_split(1, n, nb, sms))
    else:
        if perm is not None and m > GATHER_MAX_M:
            x2, perm = x2.index_select(1, perm), None
        split = gemm_split(m, n, nb, sms) if m <= SMALL_M_MAX else 1
        ternary_gemm(x2, packed, alpha, mu, bias, perm, out, split=split)
    return out.reshape(*lead, n)


def _group_fits(x, packed, alpha, mu, bias, perm, block_size) -> bool:
    """Whether the grouped GEMV covers this call (a single bf16/fp16 row, see below)."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    return (rows == 1 and x.dtype in (torch.bfloat16, torch.float16) and 2 <= len(packed) <= MAX_MEMBERS
            and members_mismatch(alpha, mu, bias, perm) is None
            and all(unsupported_reason(x, p, a, block_size) is None for p, a in zip(packed, alpha)))


def ternary_linear_group_triton(x: torch.Tensor, packed: List[torch.Tensor], alpha: List[torch.Tensor],
                                mu: List[torch.Tensor], bias: List[Optional[torch.Tensor]],
                                perm: List[Optional[torch.Tensor]],
                                block_size: int = BLOCK) -> List[torch.Tensor]:
    """[ternary_linear_triton(x, member i)]: one grouped GEMV launch (gemv_group.py) for a single
    bf16/fp16 row when the members fit it (2-3 of them, the same scale dtype, bias and permutation
    in all (of one dtype) or in none, kernel-supported shapes); otherwise one call per member."""
    if not _group_fits(x, packed, alpha, mu, bias, perm, block_size):
        return [ternary_linear_triton(x, *member, block_size) for member in zip(packed, alpha, mu, bias, perm)]
    x2 = x.reshape(1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    outs = ternary_gemv_group(x2, *([_dense(t) for t in ts] for ts in (packed, alpha, mu, bias, perm)))
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in outs]


def add_rms_norm_group_triton(a: torch.Tensor, b: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                              packed: List[torch.Tensor], alpha: List[torch.Tensor], mu: List[torch.Tensor],
                              bias: List[Optional[torch.Tensor]], perm: List[Optional[torch.Tensor]],
                              block_size: int = BLOCK) -> List[torch.Tensor]:
    """[h, *ternary_linear_group_triton(rms_norm(h), ...)] with h = a + b: the add and the norm
    inside the grouped GEMV's x quantization (norm_group.py) where that GEMV applies and the norm
    weight has a's dtype; otherwise the add and norm in torch, then the group as above."""
    if not (_group_fits(a, packed, alpha, mu, bias, perm, block_size) and norm_weight.dtype == a.dtype):
        h = a + b
        x = rms_norm_reference(h, norm_weight, eps)
        return [h, *ternary_linear_group_triton(x, packed, alpha, mu, bias, perm, block_size)]
    k = a.shape[-1]
    h, *ys = ternary_gemv_group_add_norm(a.reshape(1, k).contiguous(), b.reshape(1, k).contiguous(),
                                         norm_weight.contiguous(), eps,
                                         *([_dense(t) for t in ts] for ts in (packed, alpha, mu, bias, perm)))
    return [h.reshape(a.shape), *[y.reshape(*a.shape[:-1], y.shape[-1]) for y in ys]]
