"""What the MODEL and text arguments of the subcommands may name, and how each is loaded.

MODEL: ``smollm2`` (the embedded SmolLM2-135M-Instruct), a ``.gguf`` file, a Hugging Face model
folder (``config.json``) or, where a command accepts one, a pt2pass checkpoint folder
(``pt2pass.json``). Text: local .txt/.json/.jsonl/.parquet files or folders (``pt2pass.data``),
or ``shakespeare:NAME[,NAME...]`` for works of the embedded corpus.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models import load_gguf_causal_lm, load_smollm2, shakespeare_files, smollm2_path
from .common import CliError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
CHECKPOINT_META = "pt2pass.json"
SHAKESPEARE_PREFIX = "shakespeare:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
EXPECTED_MODEL = ("a Hugging Face model folder (with config.json), a .gguf file, or 'smollm2' "
                  "(the embedded SmolLM2-135M-Instruct)")
EXPECTED_ANY = EXPECTED_MODEL + ", or a pt2pass checkpoint folder (with pt2pass.json)"


@dataclass
class Loaded:
    model: nn.Module
    """An HF causal LM (full precision) or a pt2pass QuantizedCausalLM (checkpoint)."""
    tokenizer: object
    description: str
    is_checkpoint: bool = False
    meta: Optional[dict] = None
    """The checkpoint's pt2pass.json."""


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / CHECKPOINT_META).is_file()


def model_kind(spec: str) -> str:
    """"smollm2", "gguf", "hf" or "checkpoint" for a MODEL argument; CliError if it is none."""
    if spec.lower() == SMOLLM2:
        return SMOLLM2
    path = Path(spec)
    if not path.exists():
        raise CliError(f"MODEL {spec!r} does not exist; expected {EXPECTED_ANY}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise CliError(f"MODEL {spec!r} is a file but not a .gguf file; expected {EXPECTED_ANY}")
    if is_checkpoint(path):
        return "checkpoint"
    if (path / "config.json").is_file():
        return "hf"
    ggufs = sorted(path.glob("*.gguf"))
    hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
    raise CliError(f"MODEL folder {spec!r} has neither config.json nor {CHECKPOINT_META}{hint}; "
                   f"expected {EXPECTED_ANY}")


def load_model(spec: str, device: torch.device, allow_checkpoint: bool = True) -> Loaded:
    """Load MODEL (see the module docstring) onto ``device``, in eval mode."""
    kind = model_kind(spec)
    if kind == "checkpoint":
        if not allow_checkpoint:
            raise CliError(f"{spec!r} is a pt2pass checkpoint (it has {CHECKPOINT_META}); this "
                           f"command needs a full-precision model: {EXPECTED_MODEL}")
        return load_checkpoint(Path(spec), device)
    try:
        if kind == SMOLLM2:
            model, tok = load_smollm2()
            desc = f"SmolLM2-135M-Instruct ({smollm2_path().name}, dequantized to fp32)"
        elif kind == "gguf":
            model, tok = load_gguf_causal_lm(spec)
            desc = f"{Path(spec).name} (GGUF, dequantized to fp32)"
        else:
            model, tok = _load_hf_folder(Path(spec))
            desc = f"{Path(spec).name} (Hugging Face folder, fp32)"
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    return Loaded(model.to(device).eval(), tok, desc)


def _load_hf_folder(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model, load_tokenizer(folder, required=False)


def load_tokenizer(folder: Path, required: bool = True):
    """The tokenizer saved in ``folder``; None (or CliError when ``required``) if it has none."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        if required:
            raise CliError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        log.warning("%s has no tokenizer files; commands that read text will fail", folder)
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def read_checkpoint_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / CHECKPOINT_META).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CliError(f"{folder / CHECKPOINT_META} is not valid JSON: {e}") from None


def load_checkpoint(folder: Path, device: torch.device) -> Loaded:
    """A pt2pass checkpoint folder through ``pt2pass.load``, with the tokenizer saved beside it."""
    import pt2pass

    folder = Path(folder)
    if not folder.is_dir():
        raise CliError(f"checkpoint {str(folder)!r} is not a folder")
    if not is_checkpoint(folder):
        raise CliError(f"{str(folder)!r} is not a pt2pass checkpoint: it has no {CHECKPOINT_META} "
                       "(make one with `pt2pass quantize MODEL OUT`)")
    if not hasattr(pt2pass, "load"):
        raise CliError("this pt2pass has no checkpoint support (pt2pass.load is missing)")
    meta = read_checkpoint_meta(folder)
    qm = pt2pass.load(folder, device=device)
    tok = load_tokenizer(folder, required=False)
    return Loaded(qm, tok, f"pt2pass checkpoint {folder}", True, meta)


def require_tokenizer(loaded: Loaded, what: str):
    if loaded.tokenizer is None:
        raise CliError(f"{loaded.description} has no tokenizer, needed to {what}")
    return loaded.tokenizer


def text_paths(sources: Optional[Sequence[str]], default_works: Sequence[str]
               ) -> Tuple[List[Path], str]:
    """(paths, description) of text arguments; None means the embedded works ``default_works``."""
    if not sources:
        return _shakespeare(default_works), f"embedded Shakespeare: {', '.join(default_works)}"
    paths: List[Path] = []
    for src in sources:
        if src.startswith(SHAKESPEARE_PREFIX):
            paths += _shakespeare([w for w in src[len(SHAKESPEARE_PREFIX):].split(",") if w])
        elif not Path(src).exists():
            raise CliError(f"text source {src!r} does not exist (a .txt/.json/.jsonl/.parquet "
                           f"file or folder, or {SHAKESPEARE_PREFIX}NAME,...)")
        else:
            paths.append(Path(src))
    return paths, ", ".join(sources)


def _shakespeare(works: Sequence[str]) -> List[Path]:
    if not works:
        raise CliError(f"{SHAKESPEARE_PREFIX} needs at least one work name")
    try:
        return shakespeare_files(works)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
