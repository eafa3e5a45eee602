"""One quantized layer <-> the tensors and the JSON entry a checkpoint stores for it.

Tensors of layer ``<fqn>`` (the weight's FQN), all in the store's pre-fold form:

- ``<fqn>.codes``: ternary codes packed 5 trits per byte (uint8 (N, ceil(K / 5)),
  ``lowering.format.pack_trits``); for the GPTQ baseline the integer codes, uint8 (N, K).
- ``<fqn>.alpha``, ``<fqn>.mu``: (N, ceil(K / block_size)) in the store's dtype (fp16, or fp32
  where fp16 would overflow and for GPTQ, whose dense weight is rebuilt from them bit for bit).
- ``<fqn>.perm``: the SSR/act-order column order, each index in ceil(log2 K) bits
  (``bitpack.pack_indices``, uint8; absent when natural).

Stacked MoE experts (entry ``"experts": E``) store the same parts with the experts' rows one
after another: codes (E * N, ceil(K / 5)), alpha / mu (E, N, blocks), perm (E, bytes per order).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..lowering.format import pack_trits, unpack_trits
from ..quant.result import n_blocks
from ..store import TERNARY_METHODS, LayerQuant
from .bitpack import index_bits, pack_indices, unpack_indices
from .errors import CheckpointError

PARTS = ("codes", "alpha", "mu", "perm")
TRIT5, UINT8 = "trit5", "uint8"
DENSE_METHODS = ("gptq",)   # integer codes, stays a dense Linear after lowering


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, what: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{what}: unknown dtype {name!r}")
    return dtype


def encode_layer(layer: LayerQuant, weight_dtype: torch.dtype) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors keyed ``<fqn>.<part>``, JSON entry) for one layer of the store."""
    n, k = layer.shape[-2:]
    experts = layer.shape[0] if layer.is_experts else None
    entry = {"method": layer.method, "out_features": n, "in_features": k,
             "block_size": layer.block_size, "weight_dtype": dtype_name(weight_dtype),
             "scale_dtype": dtype_name(layer.alpha.dtype), "perm": layer.perm is not None}
    if experts is not None:
        entry["experts"] = experts
    if layer.is_ternary:
        entry["codes"] = TRIT5
        codes = pack_trits(layer.T.cpu().reshape(-1, k))
    elif layer.method in DENSE_METHODS:
        entry.update(codes=UINT8, bits=int(layer.stats.get("bits", 8)))
        codes = layer.T.cpu().to(torch.uint8).reshape(-1, k)
    else:
        raise CheckpointError(f"{layer.fqn}: method {layer.method!r} cannot be saved; supported: "
                              f"{', '.join(TERNARY_METHODS + DENSE_METHODS)}")
    if layer.alpha.dtype != layer.mu.dtype:
        raise CheckpointError(f"{layer.fqn}: alpha is {layer.alpha.dtype} but mu is {layer.mu.dtype}")
    tensors = {f"{layer.fqn}.codes": codes, f"{layer.fqn}.alpha": layer.alpha.cpu(),
               f"{layer.fqn}.mu": layer.mu.cpu()}
    if layer.perm is not None:
        orders = layer.perm.cpu().reshape(-1, k)
        packed = torch.stack([pack_indices(order, k) for order in orders])
        tensors[f"{layer.fqn}.perm"] = packed if experts is not None else packed[0]
    return {name: t.contiguous() for name, t in tensors.items()}, entry


def layer_tensor_names(fqn: str, entry: dict) -> Tuple[str, ...]:
    names = [f"{fqn}.codes", f"{fqn}.alpha", f"{fqn}.mu"]
    if entry.get("perm"):
        names.append(f"{fqn}.perm")
    return tuple(names)


def decode_layer(fqn: str, entry: dict, tensors: Dict[str, torch.Tensor], stats: dict) -> LayerQuant:
    """Rebuild the store's LayerQuant, checking every shape, dtype and value range."""
    try:
        method, n, k = entry["method"], int(entry["out_features"]), int(entry["in_features"])
        block_size, packing = int(entry["block_size"]), entry["codes"]
        scale_dtype = parse_dtype(entry["scale_dtype"], fqn)
        experts = None if entry.get("experts") is None else int(entry["experts"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"pt2pass.json: layer {fqn} has a missing or invalid field: {exc}") from exc
    if n <= 0 or k <= 0 or block_size <= 0 or (experts is not None and experts <= 0):
        raise CheckpointError(f"pt2pass.json: layer {fqn} has shape ({n}, {k}), block_size {block_size}"
                              f"{'' if experts is None else f', {experts} experts'}")
    lead = () if experts is None else (experts,)  # stacked experts: every part has E in front
    rows = n * (experts or 1)
    codes = tensors[f"{fqn}.codes"]
    if method in TERNARY_METHODS and packing == TRIT5:
        _expect(codes, f"{fqn}.codes", (rows, -(-k // 5)), torch.uint8)
        try:
            T = unpack_trits(codes, k).reshape(*lead, n, k)
        except ValueError as exc:
            raise CheckpointError(f"{fqn}.codes: codes out of range ({exc})") from exc
    elif method in DENSE_METHODS and packing == UINT8:
        _expect(codes, f"{fqn}.codes", (rows, k), torch.uint8)
        top = 2 ** int(entry.get("bits", 8)) - 1
        if codes.numel() and int(codes.max()) > top:
            raise CheckpointError(f"{fqn}.codes: codes out of range (max {int(codes.max())}, "
                                  f"{entry.get('bits')}-bit codes stop at {top})")
        T = codes.reshape(*lead, n, k)
    else:
        raise CheckpointError(f"pt2pass.json: layer {fqn} has method {method!r} with codes "
                              f"{packing!r}, which this pt2pass cannot load")
    scales = (*lead, n, n_blocks(k, block_size))
    alpha = _expect(tensors[f"{fqn}.alpha"], f"{fqn}.alpha", scales, scale_dtype)
    mu = _expect(tensors[f"{fqn}.mu"], f"{fqn}.mu", scales, scale_dtype)
    perm = None
    if entry.get("perm"):
        packed = _expect(tensors[f"{fqn}.perm"], f"{fqn}.perm", (*lead, -(-k * index_bits(k) // 8)),
                         torch.uint8)
        perm = torch.stack([unpack_indices(order, k, k) for order in packed.reshape(-1, packed.shape[-1])])
        if not torch.equal(perm.sort(dim=-1).values, torch.arange(k).expand_as(perm)):
            raise CheckpointError(f"{fqn}.perm is not a permutation of 0..{k - 1}")
        perm = perm.reshape(*lead, k)
    return LayerQuant(fqn=fqn, method=method, T=T, alpha=alpha, mu=mu, perm=perm,
                      block_size=block_size, stats=stats)


def _expect(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        what = "shape" if tuple(t.shape) != tuple(shape) else "dtype"
        raise CheckpointError(f"{name}: {what} mismatch, the file holds {t.dtype} "
                              f"{tuple(t.shape)}, pt2pass.json implies {dtype} {tuple(shape)}")
    return t
