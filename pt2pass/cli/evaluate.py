"""``pt2pass eval MODEL_OR_CHECKPOINT``: perplexity on held-out text (the paper's protocol)."""
from __future__ import annotations


from ..data import DEFAULT_EVAL_PLAYS
from ..eval.perplexity import eval_text_ids, perplexity
from .common import (CliError, add_command, add_device_arg, add_progress_arg, add_text_column_arg,
                     positive_int, resolve_device)
from .sources import EXPECTED_ANY, load_model, require_tokenizer, text_paths

DESCRIPTION = f"""Perplexity of a full-precision model or of a pt2pass checkpoint.

MODEL_OR_CHECKPOINT is {EXPECTED_ANY}. The text is tokenized once, cut into non-overlapping
windows of --seqlen tokens (the tail is dropped), each window is scored on its own and
ppl = exp(mean next-token NLL) over the first --windows windows. Perplexities are only
comparable at equal seqlen and equal text: both are printed."""

EPILOG = """examples:
  pt2pass eval smollm2 --windows 16
  pt2pass eval ckpt/smollm2-ternary --seqlen 512 --windows 64
  pt2pass eval ckpt/smollm2-ternary --text wiki.test.txt"""


def add_parser(sub) -> None:
    p = add_command(sub, "eval", "perplexity of a model or checkpoint on held-out text",
                    DESCRIPTION, EPILOG, run)
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT",
                   help="HF model folder, .gguf file, smollm2, or a pt2pass checkpoint folder")
    p.add_argument("--text", nargs="+", metavar="SOURCE",
                   help="evaluation text: .txt/.json/.jsonl/.parquet files or folders, or "
                        "shakespeare:NAME,... (default: the embedded held-out plays "
                        f"{', '.join(DEFAULT_EVAL_PLAYS)})")
    add_text_column_arg(p)
    p.add_argument("--seqlen", type=positive_int, default=512, metavar="TOKENS",
                   help="tokens per window (default 512)")
    p.add_argument("--windows", type=positive_int, default=None, metavar="N",
                   help="score only the first N windows (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="windows scored at once; speed/memory only (default 1)")
    add_device_arg(p)
    add_progress_arg(p)


def run(args) -> int:
    if args.seqlen < 2:
        raise CliError(f"--seqlen {args.seqlen} predicts no token; use --seqlen >= 2")
    device = resolve_device(args.device)
    paths, text_desc = text_paths(args.text, DEFAULT_EVAL_PLAYS)
    loaded = load_model(args.model, device)
    tok = require_tokenizer(loaded, "tokenize the evaluation text")
    ids = eval_text_ids(tok, paths, args.text_column)
    result = perplexity(loaded.model, ids, seqlen=args.seqlen, max_windows=args.windows,
                        batch_size=args.batch_size, progress=not args.no_progress)
    print(f"model: {loaded.description}")
    print(f"text: {text_desc} ({ids.numel():,} tokens)")
    print(f"perplexity: {result.ppl:.2f} (seqlen {result.seqlen}, {result.n_windows} windows, "
          f"{result.n_tokens_scored:,} predicted tokens, mean NLL {result.nll_mean:.4f} nats) "
          f"in {result.seconds:.1f} s on {device}")
    return 0
