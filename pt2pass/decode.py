"""Generation with a static KV cache: one more captured graph per (batch, cache length).

The full-sequence graph (``capture.py``, ``use_cache=False``) recomputes the whole prefix for
every new token. For generation the model is captured again, wrapped in :class:`StaticCacheLM`:

    step(input_ids (B, S), cache_position (S,)) -> logits of the last position (B, 1, V)

with a transformers ``StaticCache`` whose key/value/length tensors are *buffers* of the captured
module, written in place (``index_copy_`` / ``copy_``) at ``cache_position``. The same graph is
the prefill (S = prompt length, positions 0..S-1) and the decode step (S = 1, position t): export
keeps S symbolic in [1, max_cache_len]. Because the write position is an input, one graph serves
any number of generations without a reset. Batch and cache length are fixed at capture.

Prompts of different lengths go in one batch left-padded, with an attention mask: a *padded*
graph (``padded=True``) also takes ``attention_mask`` (B, max_cache_len) over the cache slots (0 at
the pads) and ``position_ids`` (B, S) (positions counted from each row's first real token), so a
row generates what it would alone. It is a separate graph: the plain one keeps its two inputs.

The graph carries the same ``pt2pass_weight_fqn`` tags as the full one and is lowered by the same
passes from the same store (``assemble.lowering_passes``: InsertPermutations, FoldPermutations,
LowerTernaryLinear), so it computes what the full-sequence graph computes; then the Linears that
read the same input (q/k/v, gate/up) are grouped into one op each (GroupSiblingLinears: one
kernel launch per group at batch 1). Packed weights equal to the full graph's are shared with it
rather than held twice.

A causal LM's *skeleton* (:func:`make_skeleton`) is what later captures start from: the model's
module tree with its non-quantized tensors and the quantized Linear weights on the meta device.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .assemble import lower_from_store, real_device, traceable_weights
from .cache_shapes import probe_cache_shapes
from .capture import CaptureError, capture_error_message, tag_linears
from .experts import tag_experts
from .lowering.fuse_add_rms_norm import FuseAddRMSNorm, fuse_norm_default
from .lowering.group_siblings import GroupSiblingLinears
from .lowering.lower import fetch_attr
from .lowering.lower_attention import LowerDecodeAttention
from .lowering.ops import compile_fresh
from .pass_manager import PassManager
from .sampling import EosIds, NextLogits, Sampling, check_padding_mask, check_prompt, generation_loop
from .store import QuantStore

log = logging.getLogger(__name__)

CACHE_PREFIX = "pt2pass_kv_"   # buffer names: pt2pass_kv_keys_<layer>, _values_, _length_
CACHE_LEN_MULTIPLE = 256       # cache lengths are rounded up so that prompts share one graph


def make_skeleton(model: nn.Module, store: QuantStore) -> nn.Module:
    """A copy of ``model``'s module tree holding no quantized Linear weight.

    Every module is a new object (the user's later ``train()``, hooks or attribute changes do not
    reach it); parameters are frozen ``Parameter``s sharing storage with ``model``'s (tied
    weights stay tied), buffers are shared; the weights named in ``store`` become meta tensors of
    the same shape and dtype, so the skeleton keeps no second full-precision copy of them.
    """
    params: Dict[int, nn.Parameter] = {}
    modules: Dict[int, nn.Module] = {}

    def clone(module: nn.Module, prefix: str) -> nn.Module:
        if id(module) in modules:
            return modules[id(module)]
        new = modules[id(module)] = copy.copy(module)
        for key, value in vars(module).items():
            if isinstance(value, (dict, set)):  # _parameters, _modules, hook tables, ...
                new.__dict__[key] = copy.copy(value)
        for name, p in module._parameters.items():
            if p is None:
                continue
            if prefix + name in store:
                new._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                     requires_grad=False)
            else:
                if id(p) not in params:
                    params[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
                new._parameters[name] = params[id(p)]
        for name, child in module._modules.items():
            new._modules[name] = None if child is None else clone(child, f"{prefix}{name}.")
        return new

    return clone(model, "").eval()


def cache_length_for(total_tokens: int, max_positions: Optional[int]) -> int:
    """The cache length a generation of ``total_tokens`` uses: rounded up to a multiple of
    CACHE_LEN_MULTIPLE (so varied prompt lengths reuse one graph), capped at the model's limit."""
    length = -(-total_tokens // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE
    return min(length, max_positions) if max_positions else length


class StaticCacheLM(nn.Module):
    """``lm`` over a StaticCache held in buffers: forward(input_ids, cache_position) -> logits of
    the last position (``all_logits``: of every position, for scoring a padded prompt).

    The LM's children are registered on this module directly (the LM itself is not), so parameter
    FQNs — and the capture's weight tags — are the LM's own, i.e. the store's keys.
    """

    def __init__(self, lm: nn.Module, batch_size: int, max_cache_len: int,
                 dtype: torch.dtype, device: torch.device, all_logits: bool = False,
                 layer_shapes: Optional[list] = None):
        from transformers.cache_utils import StaticCache, StaticLayer, StaticSlidingWindowLayer

        super().__init__()
        object.__setattr__(self, "lm", lm)
        self.logits_to_keep = 0 if all_logits else 1  # 0: all (HF's convention)
        for name, child in lm.named_children():
            self.add_module(name, child)
        for name, p in lm.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in lm.named_buffers(recurse=False):
            self.register_buffer(name, b)
        config = lm.config.get_text_config(decoder=True)
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        # A sliding-window layer's own cache rolls on a Python-int length, which one captured graph
        # cannot follow; it gets a full-length layer instead, and the window comes from the mask
        # HF builds for it (kv > q - window, on absolute positions): exact at any length, at the
        # memory of a full-attention layer's cache.
        self.cache.layers = [StaticLayer(max_cache_len=max_cache_len)
                             if type(layer) is StaticSlidingWindowLayer else layer
                             for layer in self.cache.layers]
        other = {type(layer).__name__ for layer in self.cache.layers
                 if type(layer) is not StaticLayer}
        if other:
            raise NotImplementedError(
                f"{type(lm).__name__} needs cache layers of type {sorted(other)}; the static "
                "decode graph supports full-attention and sliding-window layers only")
        if layer_shapes is not None and len(layer_shapes) == len(self.cache.layers):
            # what each layer caches (cache_shapes.py: latent attention's keys and values differ)
            for layer, (heads, k_dim, v_dim) in zip(self.cache.layers, layer_shapes):
                layer.lazy_initialization(torch.zeros((batch_size, heads, 0, k_dim), dtype=dtype, device=device),
                                          torch.zeros((batch_size, heads, 0, v_dim), dtype=dtype, device=device))
        else:
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = (getattr(config, "head_dim", None)
                        or config.hidden_size // config.num_attention_heads)
            self.cache.early_initialization(batch_size, heads, head_dim, dtype, device)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"{CACHE_PREFIX}keys_{i}", layer.keys, persistent=False)
            self.register_buffer(f"{CACHE_PREFIX}values_{i}", layer.values, persistent=False)
            self.register_buffer(f"{CACHE_PREFIX}length_{i}", layer.cumulative_length,
                                 persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        for i, layer in enumerate(self.cache.layers):
            # Read the cache through this module's attributes: torch.export traces those (the
            # layer's own references would be baked in as constants).
            layer.keys = getattr(self, f"{CACHE_PREFIX}keys_{i}")
            layer.values = getattr(self, f"{CACHE_PREFIX}values_{i}")
            layer.cumulative_length = getattr(self, f"{CACHE_PREFIX}length_{i}")
            # Writes go at cache_position, not after whatever earlier calls left in the cache.
            layer.cumulative_length.copy_(cache_position[0])
        padding = {} if attention_mask is None else dict(
            attention_mask=attention_mask, position_ids=position_ids, cache_position=cache_position)
        out = self.lm(input_ids=input_ids, past_key_values=self.cache, use_cache=True,
                      logits_to_keep=self.logits_to_keep, **padding)
        return out.logits


def decode_attention_default() -> bool:
    """Whether decode graphs take LowerDecodeAttention: yes unless ``PT2PASS_DECODE_ATTENTION=0``
    (read when a graph is built)."""
    value = os.environ.get("PT2PASS_DECODE_ATTENTION", "1")
    if value not in ("0", "1"):
        raise ValueError(f"PT2PASS_DECODE_ATTENTION={value!r}: use 1 (the decode attention kernel) or 0 (SDPA)")
    return value == "1"


def build_decode_graph(skeleton: nn.Module, store: QuantStore, batch_size: int, max_cache_len: int,
                       share_with: Optional[fx.GraphModule] = None,
                       group_siblings: bool = True, decode_attention: Optional[bool] = None,
                       padded: bool = False, all_logits: bool = False) -> fx.GraphModule:
    """Capture ``skeleton`` around a static cache and lower it with the store's results.

    ``share_with``: a lowered graph of the same model whose equal buffers (packed weights,
    scales, permutations) the new graph should reuse instead of holding copies.
    ``group_siblings``: group the Linears that read the same input (GroupSiblingLinears).
    ``decode_attention``: attention through ``pt2pass.attention`` (LowerDecodeAttention: the
    split-cache decode kernel on the GPU; SDPA elsewhere); default on, off with
    ``PT2PASS_DECODE_ATTENTION=0``. ``padded``: the step also takes ``attention_mask`` and
    ``position_ids``, for left-padded batches (module doc). ``all_logits``: the step returns the
    logits of every position it is given, not only the last (scoring padded batches).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    if not (isinstance(max_cache_len, int) and max_cache_len >= 2):
        raise ValueError(f"max_cache_len={max_cache_len!r} must be an integer >= 2")
    weights = dict(skeleton.named_parameters(remove_duplicate=False))
    missing = [fqn for fqn in store.layers if fqn not in weights]
    if missing:
        raise ValueError(f"quantized layers {missing[:3]} are not parameters of "
                         f"{type(skeleton).__name__}: the skeleton does not match the store")
    dtype, device = model_placement(skeleton)
    module = StaticCacheLM(skeleton, batch_size, max_cache_len, dtype, device, all_logits,
                           layer_shapes=probe_cache_shapes(skeleton))
    args, dims = step_inputs(batch_size, max_cache_len, device, padded)
    try:
        with traceable_weights(skeleton, store, device), torch.no_grad():
            ep = torch.export.export(module, args, dynamic_shapes=dims, strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with guidance
        raise CaptureError(capture_error_message(skeleton, exc)) from exc
    gm = ep.module()
    tag_linears(gm, module)
    tag_experts(gm, module)
    gm, _ = lower_from_store(gm, store, weights, device)
    if decode_attention is None:
        decode_attention = decode_attention_default()
    passes = [GroupSiblingLinears()] if group_siblings else []
    passes += [FuseAddRMSNorm()] if group_siblings and fuse_norm_default() else []
    passes += [LowerDecodeAttention()] if decode_attention else []
    if passes:
        gm = PassManager(passes)(gm)
    left = [n for n, t in [*gm.named_parameters(), *gm.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"the decode graph still reads meta tensors after lowering: {left[:3]} "
                         "(a quantized weight used by an op other than its Linear?)")
    if share_with is not None:
        share_equal_buffers(gm, share_with)
    check_one_token_step(gm, type(skeleton).__name__, batch_size, max_cache_len, device, padded)
    log.info("decode graph: batch %d, cache length %d, %s on %s", batch_size, max_cache_len,
             dtype, device)
    return gm


def model_placement(model: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """(dtype of the activations and so of the cache: that of the first real floating-point
    parameter, device of the model's real tensors)."""
    for p in model.parameters():
        if p.device.type != "meta" and p.is_floating_point():
            return p.dtype, real_device(model)
    raise ValueError(f"{type(model).__name__} has no real floating-point parameter")


class OneTokenStepError(NotImplementedError):
    """The captured step cannot run one token (check_one_token_step)."""


def check_one_token_step(gm: fx.GraphModule, model_name: str, batch_size: int, max_cache_len: int,
                         device, padded: bool) -> None:
    """Run the step once on one token, then empty the cache again: some models' position code
    (e.g. OPT's) is captured with a data-dependent length that must be >= 2, and would fail at the
    first decode step with torch's bare runtime assertion."""
    ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    mask = torch.ones(batch_size, max_cache_len, dtype=torch.long, device=device)
    padding = (mask, mask_positions(mask)[:, :1].contiguous()) if padded else ()
    try:
        with torch.no_grad():
            gm(ids, torch.zeros(1, dtype=torch.long, device=device), *padding)
            for name, t in gm.named_buffers():
                if name.startswith(CACHE_PREFIX):
                    t.zero_()
    except RuntimeError as exc:
        if "Runtime assertion failed" not in str(exc):
            raise
        raise OneTokenStepError(
            f"{model_name}'s static-cache decode step was captured for two or more tokens only "
            f"(torch.export: {exc}); export the padded step instead (padded=True: positions as an "
            "input), which QuantizedCausalLM.generate falls back to") from exc


def share_equal_buffers(gm: fx.GraphModule, source: nn.Module) -> int:
    """Point ``gm``'s buffers at ``source``'s buffers of the same name where they are equal
    (same shape, dtype, device and values): lowering the same store twice yields equal packed
    weights, which need not be held twice. Returns how many were shared."""
    theirs = dict(source.named_buffers())
    shared = 0
    for name, mine in list(gm.named_buffers()):
        other = theirs.get(name)
        if (other is None or other is mine or other.shape != mine.shape or other.dtype != mine.dtype
                or other.device != mine.device or not torch.equal(other, mine)):
            continue
        prefix, _, attr = name.rpartition(".")
        (gm.get_submodule(prefix) if prefix else gm).register_buffer(attr, other)
        shared += 1
    return shared


class CachedDecoder:
    """Runs a static-cache step module (a lowered decode graph or a loaded program's module):
    the prompt in one call, then one token per call, optionally CUDA-graphed (``compile_decode``:
    the default of :meth:`generate` and :meth:`logits_fn`)."""

    def __init__(self, step: nn.Module, compile_decode: bool = False):
        keys = [t for n, t in step.named_buffers() if n.startswith(f"{CACHE_PREFIX}keys_")]
        if not keys:
            raise ValueError(f"{type(step).__name__} has no {CACHE_PREFIX}* cache buffers: not a "
                             "pt2pass decode graph")
        self.step = step
        self.batch_size, _, self.max_cache_len, _ = keys[0].shape
        # a padded step takes (input_ids, cache_position, attention_mask, position_ids)
        graph = getattr(step, "graph", None)
        self.padded = isinstance(graph, fx.Graph) and len(
            [n for n in graph.nodes if n.op == "placeholder"]) == 4
        self.device = keys[0].device
        self.vocab_size = _embedding_rows(step)
        self.compile_decode = compile_decode
        self._compiled: Optional[Callable] = None

    def compiled_step(self) -> Callable:
        """The step compiled with CUDA graphs (``mode="reduce-overhead"``), compiled once, with the
        kernel choices traced anew (``ops.compile_fresh``: never from torch's AOTAutograd cache).
        The cache buffers are written in place, so their addresses are fixed and the graph can be
        replayed; the first one-token call records it."""
        if self._compiled is None:
            for name, t in self.step.named_buffers():
                if name.startswith(CACHE_PREFIX):
                    torch._dynamo.mark_static_address(t)
            self._compiled = compile_fresh(self.step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        return self._compiled

    def logits_fn(self, compile_decode: Optional[bool] = None,
                  attention_mask: Optional[torch.Tensor] = None) -> NextLogits:
        """``sampling.NextLogits`` over this cache: the prompt on the first call (eagerly), then
        only ids[:, -1] (through the compiled step when ``compile_decode``). ``attention_mask``:
        the prompt's (B, P) left-padding mask (checked by ``sampling.check_padding_mask``),
        padded steps only; the slots after the prompt count as tokens."""
        if compile_decode is None:
            compile_decode = self.compile_decode
        if attention_mask is not None and not self.padded and not bool(attention_mask.all()):
            raise ValueError("this decode graph takes no attention_mask: build it with padded=True "
                             "(QuantizedCausalLM.generate does when the mask pads a row)")
        cache_mask = None
        if self.padded:
            cache_mask = self._cache_mask(attention_mask)
            slot_positions = mask_positions(cache_mask)  # once per generation, not per step
        one_token = self.compiled_step() if compile_decode else None

        def next_logits(ids: torch.Tensor, first: bool) -> torch.Tensor:
            if ids.shape[0] != self.batch_size:
                raise ValueError(f"this decode graph was built for batch {self.batch_size}, got "
                                 f"{ids.shape[0]}")
            if ids.shape[1] > self.max_cache_len:
                raise ValueError(f"{ids.shape[1]} tokens do not fit the cache of "
                                 f"{self.max_cache_len}")
            start = 0 if first else ids.shape[1] - 1
            # A fresh copy: a column sliced from the growing (B, T) ids has strides (T, 1), which
            # fail the compiled step's stride guards (a recompile per token, until dynamo's limit).
            # .contiguous() does not help when B == 1: a (1, 1) view counts as contiguous.
            tokens = ids[:, start:].clone(memory_format=torch.contiguous_format)
            positions = torch.arange(start, ids.shape[1], device=ids.device)
            inputs = (tokens, positions)
            if cache_mask is not None:
                # a fresh contiguous copy, as for the tokens (the compiled step's stride guards)
                inputs += (cache_mask, slot_positions[:, start:ids.shape[1]].clone(
                    memory_format=torch.contiguous_format))
            if one_token is not None and tokens.shape[1] == 1:
                # CUDA graphs reuse their output memory: start a new step so that the previous
                # logits (already consumed) may be overwritten, and copy these out.
                torch.compiler.cudagraph_mark_step_begin()
                return one_token(*inputs)[:, -1].clone()
            return self.step(*inputs)[:, -1]

        return next_logits

    def _cache_mask(self, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """A padded step's (B, max_cache_len) mask: ``attention_mask`` over the first slots, ones
        after (the slots generation will write)."""
        cache_mask = torch.ones(self.batch_size, self.max_cache_len, dtype=torch.long, device=self.device)
        if attention_mask is not None:
            if attention_mask.shape[0] != self.batch_size or attention_mask.shape[1] > self.max_cache_len:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not fit this "
                                 f"decode graph (batch {self.batch_size}, cache {self.max_cache_len})")
            cache_mask[:, :attention_mask.shape[1]] = attention_mask
        return cache_mask

    def prompt_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, S, vocab) of every position of ``input_ids`` (B, S), run as one prompt through
        this padded step under ``attention_mask`` (B, S; 0 / 1, each row's tokens in consecutive
        slots: left or right padding; each slot's position is the number of its row's tokens
        before it, as the row alone would have it). Overwrites the cache."""
        if not self.padded:
            raise ValueError("prompt_logits needs a padded decode graph (build_decode_graph(padded=True))")
        if input_ids.shape[0] != self.batch_size or input_ids.shape[1] > self.max_cache_len:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} do not fit this decode graph "
                             f"(batch {self.batch_size}, cache {self.max_cache_len})")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape "
                             f"{tuple(input_ids.shape)}")
        cache_mask = self._cache_mask(attention_mask)
        s = input_ids.shape[1]
        positions = mask_positions(cache_mask)[:, :s].contiguous()
        with torch.no_grad():
            return self.step(input_ids, torch.arange(s, device=input_ids.device), cache_mask, positions)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
                 compile_decode: Optional[bool] = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None,
                 eos_token_id: EosIds = None, generator: Optional[torch.Generator] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As ``QuantizedCausalLM.generate``, limited by this cache's batch size and length;
        ``attention_mask`` (left padding) on padded steps only."""
        sampling = Sampling(do_sample, temperature, top_k, generator)
        check_prompt(input_ids, max_new_tokens, self.max_cache_len, "the cache length",
                     vocab_size=self.vocab_size)
        if attention_mask is not None:
            check_padding_mask(attention_mask, input_ids)
        with torch.no_grad():
            return generation_loop(self.logits_fn(compile_decode, attention_mask), input_ids,
                                   max_new_tokens, sampling, eos_token_id)


def _embedding_rows(step: nn.Module) -> Optional[int]:
    """Rows of the token embedding that a captured step reads first (its vocabulary size), or
    None when the step is not an fx graph with an aten.embedding."""
    graph = getattr(step, "graph", None)
    for node in graph.nodes if isinstance(graph, fx.Graph) else ():
        if node.target is torch.ops.aten.embedding.default and node.args[0].op == "get_attr":
            return int(fetch_attr(step, node.args[0].target).shape[0])
    return None


def generate_with_program(program: torch.export.ExportedProgram, input_ids: torch.Tensor,
                          max_new_tokens: int = 32, **sampling) -> torch.Tensor:
    """Generate with a decode program from ``pt2pass.export(qm, graph="decode", ...)``, e.g.
    after ``torch.export.load`` in a process that imported pt2pass.

    The cache lives in the program's buffers and is written in place by each call, so one
    ``program.module()`` must serve the whole generation: this calls it once. To generate many
    times without re-unlifting, keep ``CachedDecoder(program.module())`` and call its
    ``generate``. Sampling keywords are those of ``QuantizedCausalLM.generate``.
    """
    return CachedDecoder(program.module()).generate(input_ids, max_new_tokens, **sampling)


def export_decode_graph(gm: fx.GraphModule) -> torch.export.ExportedProgram:
    """``torch.export`` a lowered decode graph: the cache buffers stay buffers, mutated in place,
    and the token count S stays symbolic in [1, cache length]."""
    step = CachedDecoder(gm)
    args, dims = step_inputs(step.batch_size, step.max_cache_len, step.device, step.padded)
    with torch.no_grad():
        return torch.export.export(gm, args, dynamic_shapes=dims, strict=False)


def step_inputs(batch_size: int, max_cache_len: int, device: torch.device, padded: bool = False):
    """Example (input_ids, cache_position[, attention_mask, position_ids]) and their dynamic
    shapes: S tokens, S in [1, max_cache_len] (S = 1 is the decode step, so export must not
    specialise it away); the attention mask always covers the whole cache."""
    args = (torch.zeros(batch_size, 2, dtype=torch.long, device=device),
            torch.arange(2, device=device))
    tokens = torch.export.Dim("tokens", min=1, max=max_cache_len)
    if not padded:
        return args, ({1: tokens}, {0: tokens})
    mask = torch.ones(batch_size, max_cache_len, dtype=torch.long, device=device)
    padding = (mask, mask_positions(mask)[:, :2].contiguous())
    return args + padding, ({1: tokens}, {0: tokens}, None, {1: tokens})


def mask_positions(cache_mask: torch.Tensor) -> torch.Tensor:
    """The position of every cache slot under a padded step's (B, L) mask: each row's real tokens
    before the slot (0 on its left pads, which the mask hides)."""
    return (cache_mask.cumsum(1) - 1).clamp(min=0)

