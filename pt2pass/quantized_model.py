"""QuantizedModel: the module ``pt2pass.compile`` returns.

It wraps the lowered GraphModule and is called like the original model (an HF causal LM returns
an output with ``.logits``). It carries the quantization store (per-layer results and report).
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .lowering.lower import TERNARY_EXPERTS_OP, TERNARY_OP
from .data import check_token_ids
from .sampling import EosIds, Sampling, check_padding_mask, check_prompt, check_scoring_mask, generation_loop
from .store import QuantStore

log = logging.getLogger(__name__)


class QuantizedModel(nn.Module):
    """A compiled module taking the same positional inputs as the captured one."""

    causal_lm = False

    def __init__(self, graph: fx.GraphModule, store: QuantStore, model_config: Any = None,
                 pass_history: Optional[list] = None):
        super().__init__()
        _freeze_parameters(graph)
        self.gm = graph
        self.store = store
        self.model_config = model_config
        self.pass_history = list(pass_history or [])

    def forward(self, *args):
        return self.gm(*args)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .bfloat16() would convert the graph's tensors but not the store,
        # the skeleton or the dtypes baked into the traced graph: forward then fails deep inside,
        # generate keeps the old dtype and save records the old one. Refuse, naming the way out.
        dtype = next((t.dtype for t in itertools.chain(self.gm.parameters(), self.gm.buffers())
                      if t.is_floating_point()), None)
        if dtype is not None and fn(torch.zeros((), dtype=dtype)).dtype != dtype:
            raise TypeError(f"a pt2pass model keeps the dtype it was compiled in ({dtype}); to "
                            "run in another dtype, compile it from a model in that dtype, e.g. "
                            "pt2pass.compile(model.to(torch.bfloat16), calib_data) (a checkpoint "
                            "loads in the dtype it was saved in)")
        return super()._apply(fn, recurse)

    def report(self) -> List[Dict[str, Any]]:
        """Per-layer quantization report (E_w, E_x after ITF and AGA, block order, time)."""
        return self.store.report()

    def ternary_node_count(self) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.target is TERNARY_OP)

    def experts_node_count(self) -> int:
        """pt2pass.ternary_experts nodes (stacked MoE experts)."""
        return sum(1 for n in self.gm.graph.nodes if n.target is TERNARY_EXPERTS_OP)


class QuantizedCausalLM(QuantizedModel):
    """A compiled HF causal LM: ``qm(input_ids).logits`` as with the original model, and
    ``qm.generate`` with a static KV cache (``pt2pass/decode.py``).

    ``skeleton``: the HF model to capture the decode graphs from, whose quantized Linear weights
    may be on the meta device (``decode.make_skeleton``). It is held outside the module tree, so
    ``state_dict``, ``parameters`` and ``export`` of this module see the lowered graph only.
    """

    causal_lm = True

    def __init__(self, graph: fx.GraphModule, store: QuantStore, model_config: Any = None,
                 pass_history: Optional[list] = None, skeleton: Optional[nn.Module] = None):
        super().__init__(graph, store, model_config, pass_history)
        object.__setattr__(self, "skeleton", skeleton)
        # (batch, cache length, dtype, device) -> CachedDecoder, built on first use
        self._decoders: Dict[Tuple, Any] = {}

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """Logits of every position, as the original model's forward. ``attention_mask`` (B, S),
        0 at pads: a mask of ones runs the full-sequence graph as without one; left or right
        padding runs the prompt through a padded decode graph, so that every row gets the logits
        it gets alone, at its real positions (the pads' logits are meaningless). That graph and
        its KV cache are built on first use per batch size and length and kept, as generate's are
        (``clear_decoders`` frees them). Padding between tokens is refused: sliding-window
        attention counts distances in slots, so such a row would not see what it sees alone."""
        self._check_input_ids(input_ids)
        if attention_mask is not None:
            mask = check_scoring_mask(attention_mask, input_ids)
            if not bool(mask.all()):
                return CausalLMOutputWithPast(logits=self._padded_logits(input_ids, mask))
        return self.gm(input_ids=input_ids, use_cache=False)

    def _check_input_ids(self, input_ids) -> None:
        """2-D integer ids within the vocabulary, named here rather than as an IndexError in the
        embedding. The values are not checked while torch.compile or torch.export traces: they are
        unknown there (fake tensors), and reading them would break the graph."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch, sequence), got shape {tuple(input_ids.shape)}")
        if torch.compiler.is_compiling() or type(input_ids) is not torch.Tensor:  # Fake/FunctionalTensor
            return
        check_token_ids(input_ids, getattr(self.model_config, "vocab_size", None), what="input_ids")

    def _padded_logits(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if ((mask.diff(dim=1) > 0).sum(1) + mask[:, 0] > 1).any():  # a row's tokens start twice
            raise ValueError("attention_mask has padding between tokens: scoring takes left or right "
                             "padding (a row's tokens in consecutive slots)")
        if self.max_positions is not None and input_ids.shape[1] > self.max_positions:
            raise ValueError(f"a padded batch of {input_ids.shape[1]} tokens exceeds the model's "
                             f"max_position_embeddings ({self.max_positions}): the padded graph's cache "
                             "cannot hold it")
        decoder = self.decoder(input_ids.shape[0], input_ids.shape[1], input_ids.device, padded=True,
                               all_logits=True)
        return decoder.prompt_logits(input_ids, mask)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                 eos_token_id: EosIds = None, generator: Optional[torch.Generator] = None,
                 use_cache: bool = True, compile_decode: Optional[bool] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Prompt ``input_ids`` (B, P) followed by up to ``max_new_tokens`` tokens, (B, P + n).

        Greedy by default; ``do_sample`` draws from softmax(logits / temperature), restricted to
        the ``top_k`` most likely tokens, with ``generator`` for reproducibility. With
        ``eos_token_id`` (an id or a list of ids) a finished row is padded with the (first) id
        and generation stops once all rows finished. ``use_cache``: prefill + one decode step per
        token over a static KV cache (a decode graph built on first use per batch size and cache
        length, the cache length being
        P + max_new_tokens rounded up to a multiple of 256); False re-runs the full sequence per
        token (``generate_no_cache``). ``compile_decode``: CUDA-graph the decode step with
        ``torch.compile(mode="reduce-overhead")``; default True on CUDA, False on CPU.
        ``attention_mask`` (B, P): prompts of different lengths, left-padded (0 at the pads, as a
        tokenizer with ``padding_side="left"`` returns); each row generates what it would alone,
        through a padded decode graph (``decode`` module doc); the pads stay in the output.
        """
        sampling = Sampling(do_sample, temperature, top_k, generator)
        check_prompt(input_ids, max_new_tokens, self.max_positions,
                     vocab_size=getattr(self.model_config, "vocab_size", None))
        padded = attention_mask is not None and check_padding_mask(attention_mask, input_ids)
        if padded and not use_cache:
            raise ValueError("attention_mask pads a row: that needs the static cache (use_cache=True); "
                             "the full-sequence graph has no mask input")
        if max_new_tokens == 0:
            return input_ids.long()  # int64, as every other length returns
        if use_cache:
            if compile_decode is None:
                compile_decode = input_ids.device.type == "cuda"
            decoder = self.decoder(input_ids.shape[0], input_ids.shape[1] + max_new_tokens,
                                   input_ids.device, padded)
            next_logits = decoder.logits_fn(compile_decode, attention_mask if padded else None)
        else:
            next_logits = self._full_sequence_logits
        return generation_loop(next_logits, input_ids, max_new_tokens, sampling, eos_token_id)

    def generate_no_cache(self, input_ids: torch.Tensor, max_new_tokens: int = 32,
                          **sampling) -> torch.Tensor:
        """``generate`` re-running the full-sequence graph over the whole sequence per token
        (no cache, no decode graph): the reference the cached path must match."""
        return self.generate(input_ids, max_new_tokens, use_cache=False, **sampling)

    def _full_sequence_logits(self, ids: torch.Tensor, first: bool) -> torch.Tensor:
        return self(ids).logits[:, -1, :]

    @property
    def max_positions(self) -> Optional[int]:
        """The model's max_position_embeddings (None when its config does not say)."""
        return getattr(self.model_config, "max_position_embeddings", None)

    def decoder(self, batch_size: int, total_tokens: int, device: torch.device, padded: bool = False,
                all_logits: bool = False):
        """The ``CachedDecoder`` for this batch size whose cache holds ``total_tokens`` (its
        length rounded up, see ``decode.cache_length_for``), padded or not, returning the last
        position's logits or (``all_logits``, for scoring) every position's; captured and lowered
        on first use."""
        from .decode import (CachedDecoder, OneTokenStepError, build_decode_graph, cache_length_for,
                             decode_attention_default, model_placement)
        from .lowering.fuse_add_rms_norm import fuse_norm_default

        if self.skeleton is None:
            raise ValueError("this QuantizedCausalLM has no skeleton model to capture a decode "
                             "graph from: pass skeleton= when constructing it, or use "
                             "generate(use_cache=False)")
        dtype, model_device = model_placement(self.skeleton)
        if torch.device(device) != model_device:
            raise ValueError(f"input_ids are on {device} but the model is on {model_device}")
        length = cache_length_for(total_tokens, self.max_positions)
        attention = decode_attention_default()  # a graph per setting: flipping one takes effect
        key = (batch_size, length, dtype, model_device, attention, fuse_norm_default(), all_logits, padded)
        if key not in self._decoders:
            # outside inference mode even when called inside it: the KV cache is written in place
            # at every step, which an inference tensor forbids once the caller leaves that mode
            with torch.inference_mode(False):
                try:
                    graph = build_decode_graph(self.skeleton, self.store, batch_size, length, share_with=self.gm,
                                               decode_attention=attention, padded=padded, all_logits=all_logits)
                except OneTokenStepError:
                    # e.g. OPT, whose positions come from a mask when none are given: the padded
                    # step takes them as an input (and an all-ones mask when nothing pads)
                    log.info("%s: the plain decode step fails on one token; using the padded one",
                             type(self.skeleton).__name__)
                    graph = build_decode_graph(self.skeleton, self.store, batch_size, length, share_with=self.gm,
                                               decode_attention=attention, padded=True, all_logits=all_logits)
            self._decoders[key] = CachedDecoder(graph)
        return self._decoders[key]

    def clear_decoders(self) -> None:
        """Drop the decode graphs (and their KV caches) built by ``generate``."""
        self._decoders.clear()


def _freeze_parameters(gm: fx.GraphModule) -> None:
    """Inference only: give the graph frozen views of its remaining parameters (same storage, new
    Parameter objects) so that the user's model keeps its own ``requires_grad`` flags."""
    for name, param in list(gm.named_parameters(remove_duplicate=False)):
        if param.requires_grad:
            prefix, _, attr = name.rpartition(".")
            owner = gm.get_submodule(prefix) if prefix else gm
            setattr(owner, attr, nn.Parameter(param.detach(), requires_grad=False))
