"""Token selection and the autoregressive loop shared by every way pt2pass generates.

``qm.generate`` (static KV cache), ``qm.generate_no_cache`` (full sequence re-run each step) and
``pt2pass.decode.generate_with_program`` (a loaded ExportedProgram) differ only in how they get
the next logits; they share :func:`generation_loop`, so the same arguments and the same
``torch.Generator`` give the same tokens whenever the logits agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .data import check_token_ids

# (ids so far (B, T), first call?) -> logits of the last position (B, V). ``first`` is True for
# the prompt, False for each new token (then only ids[:, -1] is new).
NextLogits = Callable[[torch.Tensor, bool], torch.Tensor]
EosIds = Union[None, int, Sequence[int]]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (argmax) or sampled from softmax(logits / T), top-k."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    generator: Optional[torch.Generator] = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ValueError(f"temperature={self.temperature!r} must be a number")
        if self.do_sample and not t > 0:  # greedy decoding never divides by it
            raise ValueError(f"temperature={self.temperature!r} must be > 0 when sampling "
                             "(for greedy decoding use do_sample=False)")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be None or an integer >= 1")

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits -> (B,) int64 token ids."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.generator is not None and self.generator.device != scores.device:
            raise ValueError(f"the generator is on {self.generator.device} but the logits are on "
                             f"{scores.device}: create it with torch.Generator(device=...)")
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def check_prompt(input_ids: torch.Tensor, max_new_tokens: int, max_positions: Optional[int] = None,
                 limit: str = "the model's max_position_embeddings",
                 vocab_size: Optional[int] = None) -> None:
    """Clear errors for inputs no generation path can handle; ``limit`` names ``max_positions``."""
    n = max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D (batch, prompt length) tensor of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    check_token_ids(input_ids, vocab_size, what="input_ids")  # integers, non-empty, in the vocab
    total = input_ids.shape[1] + max_new_tokens
    if max_positions is not None and total > max_positions:
        raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens "
                         f"({max_new_tokens}) = {total} exceeds {limit} ({max_positions})")


def check_padding_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> bool:
    """Whether ``attention_mask`` pads any row (False when it is all ones); a clear error unless it
    is the left padding a padded decode graph generates from."""
    mask = check_scoring_mask(attention_mask, input_ids)
    if not mask[:, -1].all():
        raise ValueError("attention_mask pads the end of a row: generation needs left padding "
                         "(tokenizer.padding_side = 'left')")
    if (mask.diff(dim=1) < 0).any():
        raise ValueError("attention_mask has padding between tokens: only left padding (zeros, "
                         "then ones) is supported")
    return not bool(mask.all())


def check_scoring_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``attention_mask`` as int64 after a clear error unless it is a 0 / 1 mask of input_ids'
    shape and device with a token in every row (padding anywhere: scoring takes any)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(f"attention_mask must hold 0 / 1 (int or bool), got {attention_mask.dtype}")
    mask = attention_mask.long()
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask row {empty[0]} has no tokens (all padding)")
    return mask


def eos_ids(eos_token_id: EosIds, device: torch.device) -> Optional[torch.Tensor]:
    """``eos_token_id`` (None, an id, or several, as in Hugging Face generation configs) as a 1-D
    tensor; the first one pads finished rows."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"eos_token_id={eos_token_id!r} must be a token id >= 0 or a non-empty "
                         "list of them")
    return torch.tensor(ids, dtype=torch.long, device=device)


def generation_loop(next_logits: NextLogits, input_ids: torch.Tensor, max_new_tokens: int,
                    sampling: Sampling, eos_token_id: EosIds = None) -> torch.Tensor:
    """Prompt + up to ``max_new_tokens`` tokens, (B, P + n), int64.

    With ``eos_token_id`` (one id or several), a row that produced one keeps producing the first
    (it is also the padding) and generation stops early once every row has.
    """
    ids = input_ids.long()
    eos = eos_ids(eos_token_id, ids.device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        token = sampling.choose(next_logits(ids, step == 0))
        if eos is not None:
            token = token.masked_fill(finished, eos[0])
            finished |= torch.isin(token, eos)
        ids = torch.cat([ids, token[:, None]], dim=1)
        if eos is not None and bool(finished.all()):
            break
    return ids
