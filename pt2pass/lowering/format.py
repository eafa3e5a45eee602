"""The packed ternary weight format shared by the reference, the Triton kernels and checkpoints.

A ternarized Linear of shape (N out, K in) is stored as

- ``packed``: int32 tensor (N, K // 16). Code ``q = T + 1`` in {0, 1, 2} of element (n, k) sits in
  word ``k // 16`` of row n at bits ``2 * (k % 16)``. Rows are contiguous along K, so one thread
  loading 16 bytes gets 64 consecutive weights of one row (coalesced across a warp).
- ``alpha``, ``mu``: (N, K // block_size) floating tensors: row n of block b is
  ``alpha[n, b] * T[n, k] + mu[n, b]`` for k in block b.
- ``perm``: optional int64 (K,) input permutation (SSR): the layer computes
  ``x[..., perm] @ W_hat.T`` where ``W_hat`` is in the permuted column order.

The code 3 (bits ``11``) never occurs; ``unpack`` rejects it so that a corrupted buffer is caught.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

FORMAT_VERSION = 1
WEIGHTS_PER_WORD = 16
BITS_PER_WEIGHT = 2
DEFAULT_BLOCK_SIZE = 128



def _shifts(device) -> torch.Tensor:
    # Built per call (not a module constant) so that the function traces under torch.compile.
    return torch.arange(WEIGHTS_PER_WORD, dtype=torch.int32, device=device) * BITS_PER_WEIGHT


def pack_ternary(T: torch.Tensor) -> torch.Tensor:
    """Pack a ternary matrix (values in {-1, 0, 1}, shape (N, K), K % 16 == 0) into int32 words."""
    if T.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D matrix, got shape {tuple(T.shape)}")
    n, k = T.shape
    if k % WEIGHTS_PER_WORD:
        raise ValueError(f"pack_ternary needs in_features divisible by {WEIGHTS_PER_WORD}, got {k}")
    codes = T.to(torch.int32) + 1
    if codes.numel() and (codes.min() < 0 or codes.max() > 2):
        raise ValueError("pack_ternary expects values in {-1, 0, 1}")
    codes = codes.view(n, k // WEIGHTS_PER_WORD, WEIGHTS_PER_WORD)
    # The top code lands in bits 30-31: summing in int64 then wrapping keeps the sign bit exact.
    words = (codes.to(torch.int64) << _shifts(codes.device).to(torch.int64)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def unpack_ternary(packed: torch.Tensor, in_features: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int32 (N, K // 16) -> int8 (N, K) in {-1, 0, 1}."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed ternary weights must be a 2-D int32 tensor, got {packed.dtype} "
                         f"of shape {tuple(packed.shape)}")
    k = packed.shape[1] * WEIGHTS_PER_WORD
    if in_features is not None and in_features != k:
        raise ValueError(f"packed weight holds {k} input features, expected {in_features}")
    T = unpack_codes(packed)
    if T.numel() and bool((T == 2).any()):
        raise ValueError("corrupted packed ternary weight: code 3 is not a valid ternary value")
    return T


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Unchecked, traceable unpack: int32 (N, K // 16) -> int8 (N, K) (code 3 would give 2)."""
    codes = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 3
    return (codes.to(torch.int8) - 1).reshape(packed.shape[0], packed.shape[1] * WEIGHTS_PER_WORD)


def dequantize(packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense weight ``alpha * T + mu`` (N, K) in ``dtype``, in the packed (possibly permuted) order.

    Traceable (no data-dependent checks): the reference op path goes through here."""
    T = unpack_codes(packed)
    n, k = T.shape
    check_scales(alpha, mu, n, k)
    block = k // alpha.shape[1]
    a = alpha.to(torch.float32).repeat_interleave(block, dim=1)
    m = mu.to(torch.float32).repeat_interleave(block, dim=1)
    return (a * T.to(torch.float32) + m).to(dtype)


def check_scales(alpha: torch.Tensor, mu: torch.Tensor, out_features: int, in_features: int) -> int:
    """Validate alpha/mu shapes against the weight; return the block size."""
    if alpha.shape != mu.shape or alpha.dim() != 2 or alpha.shape[0] != out_features:
        raise ValueError(f"alpha {tuple(alpha.shape)} and mu {tuple(mu.shape)} must both be "
                         f"({out_features}, in_features // block_size)")
    n_blocks = alpha.shape[1]
    if n_blocks == 0 or in_features % n_blocks:
        raise ValueError(f"{n_blocks} scale blocks do not divide in_features={in_features}")
    return in_features // n_blocks


@dataclass
class PackedTernary:
    """One ternarized Linear in deployable form (see the module docstring for the layout)."""

    packed: torch.Tensor
    alpha: torch.Tensor
    mu: torch.Tensor
    perm: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * WEIGHTS_PER_WORD

    @property
    def block_size(self) -> int:
        return check_scales(self.alpha, self.mu, self.out_features, self.in_features)

    def nbytes(self) -> int:
        """Bytes of everything stored for this layer (packed codes, scales, permutation, bias)."""
        tensors = [self.packed, self.alpha, self.mu, self.perm, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight in the *original* input order (the permutation undone)."""
        w = dequantize(self.packed, self.alpha, self.mu, dtype)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out
