"""The packed ternary weight format shared by the reference, the Triton kernels and checkpoints.

A ternarized Linear of shape (N out, K in) is stored as

- ``packed``: int32 tensor (N, K // 16), rows contiguous along K, in *block-planar* order (format
  version 2). The columns of a row are cut into groups of 128 (the last group may be shorter, a
  multiple of 16); a group of L columns starting at column g is held by its L // 16 words, and
  code ``q = T + 1`` in {0, 1, 2} of column ``g + (L // 16) * i + j`` sits in word ``j`` of the group
  at bits ``2 * i`` (i in 0..15). For a full group: word j, bits 2i <-> column g + 8i + j.
  Why: a thread that loads 4 consecutive words (16 bytes) and extracts the codes at bits 2i needs
  the activations ``x[g + 8i + j .. +3]``, which are contiguous, so the GEMV kernel reads x with
  vector loads; the GEMM kernel interleaves the 16 extracted slices back to column order in
  registers. A 128-group is also one scale block, so each 16-byte load covers half a block.
- ``alpha``, ``mu``: (N, ceil(K / block_size)) floating tensors: weight (n, k) is
  ``alpha[n, k // block_size] * T[n, k] + mu[n, k // block_size]``. When K is not a multiple of
  the block size the last block is partial (SmolLM2's hidden size 576 = 4 x 128 + 64).
- ``perm``: optional int64 (K,) input permutation (SSR): the layer computes
  ``x[..., perm] @ W_hat.T`` where ``W_hat`` is in the permuted column order.

The code 3 (bits ``11``) never occurs; ``unpack`` rejects it so that a corrupted buffer is caught.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..quant.result import dequantize_blocks, n_blocks

FORMAT_VERSION = 2  # 2: block-planar bit order (1: code of column k at word k//16, bits 2*(k%16))
WEIGHTS_PER_WORD = 16
BITS_PER_WEIGHT = 2
DEFAULT_BLOCK_SIZE = 128
PLANAR_GROUP = 128  # columns per block-planar group (see the module docstring)


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
    codes = _to_planar(codes)  # (N, K // 16, 16): [word, bit slot]
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
    return _from_planar(codes.to(torch.int8) - 1)


def _to_planar(cols: torch.Tensor) -> torch.Tensor:
    """(N, K) values in column order -> (N, K // 16, 16) as [word, bit slot] (block-planar)."""
    n, k = cols.shape
    full = k - k % PLANAR_GROUP
    parts = []
    if full:
        g = cols[:, :full].reshape(n, full // PLANAR_GROUP, WEIGHTS_PER_WORD, PLANAR_GROUP // WEIGHTS_PER_WORD)
        parts.append(g.transpose(2, 3).reshape(n, full // WEIGHTS_PER_WORD, WEIGHTS_PER_WORD))
    if k > full:
        w = (k - full) // WEIGHTS_PER_WORD
        parts.append(cols[:, full:].reshape(n, WEIGHTS_PER_WORD, w).transpose(1, 2))
    if not parts:
        return cols.reshape(n, 0, WEIGHTS_PER_WORD)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _from_planar(slots: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_planar`: (N, K // 16, 16) [word, bit slot] -> (N, K) column order."""
    n, words, _ = slots.shape
    k = words * WEIGHTS_PER_WORD
    full = k - k % PLANAR_GROUP
    parts = []
    if full:
        wg = PLANAR_GROUP // WEIGHTS_PER_WORD
        g = slots[:, : full // WEIGHTS_PER_WORD].reshape(n, full // PLANAR_GROUP, wg, WEIGHTS_PER_WORD)
        parts.append(g.transpose(2, 3).reshape(n, full))
    if k > full:
        parts.append(slots[:, full // WEIGHTS_PER_WORD:].transpose(1, 2).reshape(n, k - full))
    if not parts:
        return slots.reshape(n, 0)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def dequantize(packed: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor,
               block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense weight ``alpha * T + mu`` (N, K) in ``dtype``, in the packed (possibly permuted) order.

    Traceable (no data-dependent checks): the reference op path goes through here."""
    T = unpack_codes(packed)
    check_scales(alpha, mu, T.shape[0], T.shape[1], block_size)
    return dequantize_blocks(T, alpha, mu, block_size).to(dtype)


def check_scales(alpha: torch.Tensor, mu: torch.Tensor, out_features: int, in_features: int,
                 block_size: int) -> None:
    """Validate alpha/mu shapes against the weight and the block size."""
    expected = (out_features, n_blocks(in_features, block_size))
    if alpha.shape != mu.shape or tuple(alpha.shape) != expected:
        raise ValueError(f"alpha {tuple(alpha.shape)} and mu {tuple(mu.shape)} must both be "
                         f"{expected} = (out_features, ceil(in_features / block_size={block_size}))")


@dataclass
class PackedTernary:
    """One ternarized Linear in deployable form (see the module docstring for the layout)."""

    packed: torch.Tensor
    alpha: torch.Tensor
    mu: torch.Tensor
    perm: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self):
        check_scales(self.alpha, self.mu, self.out_features, self.in_features, self.block_size)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * WEIGHTS_PER_WORD

    def nbytes(self) -> int:
        """Bytes of everything stored for this layer (packed codes, scales, permutation, bias)."""
        tensors = [self.packed, self.alpha, self.mu, self.perm, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight in the *original* input order (the permutation undone)."""
        w = dequantize(self.packed, self.alpha, self.mu, self.block_size, dtype)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256: 1.6 bits per weight


def pack_trits(T: torch.Tensor) -> torch.Tensor:
    """Dense storage of a ternary matrix: 5 trits per byte (uint8 (N, ceil(K / 5))).

    Byte b of a row holds codes c_i = T + 1 of columns 5b..5b+4 as sum(c_i * 3**i); a partial last
    byte is padded with code 1 (T = 0). For checkpoints; the kernels read the 2-bit layout."""
    if T.dim() != 2:
        raise ValueError(f"pack_trits expects a 2-D matrix, got shape {tuple(T.shape)}")
    n, k = T.shape
    codes = T.to(torch.int16) + 1
    if codes.numel() and (codes.min() < 0 or codes.max() > 2):
        raise ValueError("pack_trits expects values in {-1, 0, 1}")
    pad = -k % TRITS_PER_BYTE
    codes = torch.nn.functional.pad(codes, (0, pad), value=1)
    codes = codes.view(n, (k + pad) // TRITS_PER_BYTE, TRITS_PER_BYTE)  # not -1: n may be 0
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int16, device=T.device)
    return (codes * powers).sum(-1).to(torch.uint8)


def unpack_trits(data: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: uint8 (N, ceil(K / 5)) -> int8 (N, K) in {-1, 0, 1}."""
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != -(-in_features // TRITS_PER_BYTE):
        raise ValueError(f"trit-packed weights must be uint8 (N, ceil({in_features} / 5)), got "
                         f"{data.dtype} {tuple(data.shape)}")
    if data.numel() and int(data.max()) >= 3 ** TRITS_PER_BYTE:
        raise ValueError("corrupted trit-packed weight: byte value above 242")
    v = data.to(torch.int16).unsqueeze(-1)
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int16, device=data.device)
    codes = (v // powers) % 3
    codes = codes.reshape(data.shape[0], data.shape[1] * TRITS_PER_BYTE)  # not -1: N may be 0
    return (codes[:, :in_features] - 1).to(torch.int8)
