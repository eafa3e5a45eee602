"""The KV cache each decoder layer really writes, found by running one token on fake tensors.

A static cache is allocated before the decode step is traced, and transformers' own
``StaticCache.early_initialization`` gives every layer keys and values of one shape from the
config (KV heads x head_dim). Multi-head latent attention does not cache that: DeepSeek-V3 caches
its compressed latent (1 x kv_lora_rank) as keys and the rotary part (1 x qk_rope_head_dim) as
values, DeepSeek-V2 and GLM's DSA models other splits. Rather than a rule per family, one token
runs through a meta-device copy of the model with a DynamicCache under FakeTensorMode (no memory,
no real compute) and each layer's cached key and value shapes are read back.
"""
from __future__ import annotations

import logging
import weakref
from typing import List, Optional, Tuple

import torch
from torch import nn

from .checkpoint.model_tensors import meta_copy

log = logging.getLogger(__name__)

LayerShape = Tuple[int, int, int]  # (heads, key dim, value dim)


_PROBED: "weakref.WeakKeyDictionary[nn.Module, Optional[List[LayerShape]]]" = weakref.WeakKeyDictionary()


def probe_cache_shapes(lm: nn.Module) -> Optional[List[LayerShape]]:
    """(heads, key dim, value dim) of each cache layer of ``lm``, or None when the probe cannot
    run (then the config's shapes are used, as transformers does). Kept per model: each cache
    length gets a decode graph of its own, the shapes stay (~1-2 s for a full-size MoE)."""
    if lm not in _PROBED:
        _PROBED[lm] = _probe(lm)
    return _PROBED[lm]


def _probe(lm: nn.Module) -> Optional[List[LayerShape]]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.cache_utils import DynamicCache

    config = lm.config.get_text_config(decoder=True)
    try:
        # a bf16 copy on the meta device: shapes only; bf16 because torch's grouped matmul (MoE
        # experts, which transformers picks for meta tensors) has a meta kernel for bf16 alone
        probe = meta_copy(lm).to(torch.bfloat16)
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            cache = DynamicCache(config=config)
            probe(input_ids=torch.zeros((1, 1), dtype=torch.long, device="meta"), past_key_values=cache,
                  use_cache=True)
            shapes = [(int(layer.keys.shape[1]), int(layer.keys.shape[-1]), int(layer.values.shape[-1]))
                      for layer in cache.layers]
    except Exception as exc:  # noqa: BLE001 - any failure: fall back to the config's shapes
        log.debug("cache shape probe failed (%s: %s); using the config's KV shapes", type(exc).__name__, exc)
        return None
    if any(layer.keys.shape[1] != layer.values.shape[1] for layer in cache.layers):
        return None  # keys and values with different head counts: no static layer holds them
    return shapes
