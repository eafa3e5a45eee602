"""Permutation indices packed at ceil(log2 K) bits each (instead of 16 or 32).

A permutation of K columns needs log2(K!) ~ K log2 K bits; storing each index in
``index_bits(K)`` bits is within a bit per index of that, simple, and what brings a PT²-LLM
checkpoint of SmolLM2 (K = 576 or 1536) under 1.9 bits per weight all-in (int16 gives 1.90).
Bits are little-endian: index i occupies bits [i * b, (i + 1) * b) of the byte stream, and bit j
of byte B is bit 8 B + j.
"""
from __future__ import annotations

import torch


def index_bits(k: int) -> int:
    """Bits per index of a permutation of ``k`` items (at least 1)."""
    return max(1, (k - 1).bit_length())


def pack_indices(indices: torch.Tensor, k: int) -> torch.Tensor:
    """int (K,) values in [0, k) -> uint8 (ceil(K * index_bits(k) / 8),)."""
    b = index_bits(k)
    if indices.dim() != 1 or (indices.numel() and (indices.min() < 0 or indices.max() >= k)):
        raise ValueError(f"pack_indices needs a 1-D tensor of values in [0, {k})")
    bits = (indices.to(torch.int64)[:, None] >> torch.arange(b)) & 1
    bits = bits.flatten()
    bits = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)])
    return (bits.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, count: int, k: int) -> torch.Tensor:
    """The inverse of :func:`pack_indices`: int64 (count,)."""
    b = index_bits(k)
    if packed.dtype != torch.uint8 or packed.numel() != -(-count * b // 8):
        raise ValueError(f"expected {-(-count * b // 8)} uint8 bytes for {count} indices of {b} "
                         f"bits, got {packed.dtype} {tuple(packed.shape)}")
    bits = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).flatten()[: count * b]
    return (bits.view(count, b) << torch.arange(b)).sum(1)
