"""Perplexity by the paper's protocol (METHOD.md §5).

The evaluation text is tokenized once, cut into non-overlapping windows of ``seqlen`` tokens (the
tail shorter than ``seqlen`` is dropped), every window is scored independently (no context carried
over), and ppl = exp(mean next-token NLL over all predicted tokens; each window predicts
``seqlen - 1`` tokens). Results always carry seqlen and token counts, since ppl numbers are only
comparable at equal seqlen and equal text.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pt2pass.data import TEXT_SEPARATOR, check_token_ids, load_texts, tokenize_text

log = logging.getLogger(__name__)

__all__ = ["PerplexityResult", "perplexity", "tokenize_text", "eval_text_ids"]

# Logit elements turned into float32 log-probabilities at once: 512 x 49152 logits would take
# 100 MB per window in float32 (plus softmax temporaries); chunks of rows bound that to ~16 MB.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_mean: float
    """Mean next-token negative log-likelihood (nats) over all predicted tokens."""
    n_windows: int
    n_tokens_scored: int
    """Predicted tokens: n_windows * (seqlen - 1)."""
    seqlen: int
    seconds: float

    def describe(self) -> str:
        return (f"ppl {self.ppl:.2f} over {self.n_windows} windows × {self.seqlen} tokens "
                f"({self.n_tokens_scored:,} predicted tokens)")


def eval_text_ids(tokenizer, paths, text_column: str = "text") -> torch.Tensor:
    """Read local text files (.txt/.json/.jsonl/.parquet or directories), join them with blank
    lines and tokenize the whole once, as the protocol requires."""
    texts = load_texts(paths, text_column)
    return tokenize_text(tokenizer, TEXT_SEPARATOR.join(texts))


def _model_device(model_fn) -> Optional[torch.device]:
    if isinstance(model_fn, torch.nn.Module):
        for p in model_fn.parameters():
            return p.device
        for b in model_fn.buffers():
            return b.device
    return None


def _logits(model_fn, batch: torch.Tensor, kwargs) -> torch.Tensor:
    out = model_fn(batch, **kwargs)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):  # HF models with return_dict=False
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(batch.shape):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model_fn must return logits of shape (batch, seqlen, vocab) = "
                         f"({batch.shape[0]}, {batch.shape[1]}, V), got {shape}")
    return out


def _window_nll_sum(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Summed NLL of tokens 1..L-1 of one window given logits (L, V), in float32 row chunks."""
    targets = window[1:].to(logits.device)
    rows = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    total = 0.0
    n = targets.numel()  # the last position's logits predict past the window: unused
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        chunk = logits[start:stop].float()
        total += F.cross_entropy(chunk, targets[start:stop], reduction="sum").item()
    return total


def _max_positions(model_fn) -> Optional[int]:
    """The position limit of an HF model or a QuantizedCausalLM; None for a plain callable."""
    limit = getattr(model_fn, "max_positions", None)
    if limit is None:
        limit = getattr(getattr(model_fn, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def perplexity(model_fn, token_ids: torch.Tensor, *, seqlen: int, max_windows: Optional[int] = None,
               batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model_fn`` on ``token_ids`` (1-D) in non-overlapping ``seqlen`` windows.

    ``model_fn(input_ids (b, seqlen))`` may return logits (b, seqlen, vocab) or an object with
    ``.logits`` (an HF model, whose KV cache is then switched off). ``max_windows`` keeps the first
    k windows. ``batch_size`` changes speed and memory only, not the result.
    """
    for name, value in (("seqlen", seqlen), ("batch_size", batch_size), ("max_windows", max_windows)):
        if value is None and name == "max_windows":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen} predicts no token; use seqlen >= 2")
    if isinstance(token_ids, torch.Tensor) and token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if isinstance(token_ids, torch.Tensor) and token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D (the whole tokenized text), got shape "
                         f"{tuple(token_ids.shape)}")
    token_ids = check_token_ids(token_ids)
    n_windows = token_ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"only {token_ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = token_ids[: n_windows * seqlen].view(n_windows, seqlen)
    limit = _max_positions(model_fn)
    if limit is not None and seqlen > limit:
        log.warning("perplexity at seqlen=%d, beyond the model's max_position_embeddings (%d): "
                    "positions it was never trained on, the figure says little", seqlen, limit)

    device = _model_device(model_fn)
    # An HF model would otherwise build a KV cache per window that is never reused.
    is_hf = any(c.__name__ == "PreTrainedModel" for c in type(model_fn).__mro__)
    kwargs = {"use_cache": False} if is_hf else {}
    nll_sum, t0 = 0.0, time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, n_windows, batch_size), disable=not progress, unit="batch",
                          desc=f"perplexity ({n_windows} x {seqlen})"):
            batch = windows[start: start + batch_size]
            logits = _logits(model_fn, batch if device is None else batch.to(device), kwargs)
            for i in range(batch.shape[0]):
                nll_sum += _window_nll_sum(logits[i], batch[i])
            del logits
    n_scored = n_windows * (seqlen - 1)
    nll_mean = nll_sum / n_scored
    try:
        ppl = math.exp(nll_mean)
    except OverflowError:
        ppl = math.inf
    result = PerplexityResult(ppl=ppl, nll_mean=nll_mean, n_windows=n_windows,
                              n_tokens_scored=n_scored, seqlen=seqlen,
                              seconds=time.perf_counter() - t0)
    log.info("%s in %.1f s", result.describe(), result.seconds)
    return result
