"""Evaluation of (quantized) models: perplexity by the paper's protocol."""
from pt2pass.eval.perplexity import PerplexityResult, eval_text_ids, perplexity, tokenize_text

__all__ = ["PerplexityResult", "perplexity", "tokenize_text", "eval_text_ids"]
