"""``pt2pass generate MODEL_OR_CHECKPOINT --prompt ... [--prompt ...]``: continue prompts."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .common import (CliError, add_command, add_device_arg, non_negative_int, positive_float,
                     positive_int, resolve_device)
from .sources import EXPECTED_ANY, load_model, require_tokenizer

DESCRIPTION = f"""Continue --prompt with a full-precision model or a pt2pass checkpoint.

MODEL_OR_CHECKPOINT is {EXPECTED_ANY}. Several --prompt options run as one batch (prompts of
different lengths left-padded, with an attention mask). Decoding is greedy unless --do-sample is given; with
--do-sample, --temperature scales the logits, --top-k keeps the k most likely tokens, and --seed
makes the draw reproducible. Generation stops after --max-new-tokens or at the end-of-sequence
token."""

EPILOG = """examples:
  pt2pass generate smollm2 --prompt "ROMEO: But soft," --max-new-tokens 24
  pt2pass generate ckpt/smollm2-ternary --prompt "To be," --prompt "Now is the winter of"
  pt2pass generate ckpt/smollm2-ternary --prompt "To be, or not" --do-sample \
      --temperature 0.8 --top-k 50"""


def add_parser(sub) -> None:
    p = add_command(sub, "generate", "continue a prompt with a model or checkpoint",
                    DESCRIPTION, EPILOG, run)
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT",
                   help="HF model folder, .gguf file, smollm2, or a pt2pass checkpoint folder")
    p.add_argument("--prompt", required=True, action="append",
                   help="the text to continue; repeat it for a batch")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=32, metavar="N",
                   help="tokens to generate at most (default 32)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=None, metavar="T",
                   help="sampling temperature (default 1.0; needs --do-sample)")
    p.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                   help="sample among the k most likely tokens only (default: all; needs "
                        "--do-sample)")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="N",
                   help="seed of the sampling (default 0)")
    add_device_arg(p)


def run(args) -> int:
    if not args.do_sample and (args.temperature is not None or args.top_k is not None):
        raise CliError("--temperature and --top-k only apply with --do-sample")
    device = resolve_device(args.device)
    loaded = load_model(args.model, device)
    tok = require_tokenizer(loaded, "encode the prompt")
    ids, mask = _encode(tok, args.prompt)
    ids, mask = ids.to(device), mask.to(device)
    temperature = 1.0 if args.temperature is None else args.temperature
    start = time.perf_counter()
    with torch.no_grad():
        if args.max_new_tokens == 0:
            out = ids
        elif loaded.is_checkpoint:
            out = _generate_quantized(loaded.model, ids, mask, args, temperature,
                                      _checkpoint_eos(Path(args.model), tok))
        else:
            out = _generate_hf(loaded.model, ids, mask, args, temperature, tok)
    seconds = time.perf_counter() - start
    new = out[:, ids.shape[1]:]
    mode = (f"sampling (temperature {temperature}, top-k {args.top_k or 'all'}, seed {args.seed})"
            if args.do_sample else "greedy")
    print("\n\n".join(text + tok.decode(row, skip_special_tokens=True) for text, row in zip(args.prompt, new)))
    batch = f", batch {len(args.prompt)}" if len(args.prompt) > 1 else ""
    print(f"\n[{loaded.description}: {new.shape[1]} new tokens{batch} in {seconds:.1f} s "
          f"({new.shape[1] / max(seconds, 1e-9):.1f} tokens/s{' per sequence' if batch else ''}), "
          f"{mode}, {device}]")
    return 0


def _encode(tok, prompts):
    """(input_ids, attention_mask) of the prompts, left-padded to the longest."""
    encoded = [tok(text).input_ids for text in prompts]
    empty = [text for text, row in zip(prompts, encoded) if not row]
    if empty:
        raise CliError(f"--prompt {empty[0]!r} encodes to no tokens")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(row) for row in encoded)
    ids = torch.full((len(prompts), width), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(encoded):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


def _checkpoint_eos(folder: Path, tok):
    """The eos ids a checkpoint's model stops on: those of the generation config saved beside it
    (``pt2pass quantize`` copies the model's; some models list several), else the tokenizer's."""
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(folder)).eos_token_id
        if eos is not None:
            return eos
    return tok.eos_token_id


def _generate_quantized(qm, ids, mask, args, temperature, eos_token_id):
    generator = torch.Generator(device=ids.device).manual_seed(args.seed)
    return qm.generate(ids, args.max_new_tokens, do_sample=args.do_sample, temperature=temperature,
                       top_k=args.top_k, eos_token_id=eos_token_id, generator=generator,
                       attention_mask=mask)


def _generate_hf(model, ids, mask, args, temperature, tok):
    torch.manual_seed(args.seed)  # HF sampling draws from the global generator
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                  attention_mask=mask, pad_token_id=pad)
    if args.do_sample:
        # top_k=0 switches HF's default top-k of 50 off, as "all" means here
        kwargs.update(temperature=temperature, top_k=args.top_k or 0)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)  # silence sampling-only defaults
    return model.generate(ids, **kwargs)
