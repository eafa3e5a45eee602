"""Calibration and evaluation text sources, turned into fixed-length token windows.

Every accepted form of calibration data ends up as one or more 1-D token *streams* that are cut
into non-overlapping windows of ``seqlen`` tokens (each stream's tail shorter than ``seqlen`` is
dropped). Texts are joined with ``"\\n\\n"`` and tokenized once, as in the paper's perplexity
protocol, so windows do not start at artificial document boundaries and nothing is padded.

Datasets are only ever read from local files or in-memory objects: no hub access.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence

import torch

log = logging.getLogger(__name__)

# Disjoint play sets (checked against pt2pass.models.shakespeare_plays() in the tests), so a
# model calibrated on DEFAULT_CALIB_PLAYS is never evaluated on text it was calibrated on.
DEFAULT_CALIB_PLAYS = ("hamlet", "macbeth", "othello", "lear", "romeo_and_juliet",
                       "julius_caesar", "tempest", "twelfth_night")
DEFAULT_EVAL_PLAYS = ("as_you_like_it", "merchant_of_venice", "much_ado_about_nothing",
                      "winters_tale")

TEXT_SEPARATOR = "\n\n"
TEXT_SUFFIXES = (".txt",)
DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize one (possibly very long) text into a 1-D LongTensor, without special tokens.

    No truncation, and ``verbose=False`` silences HF's "sequence longer than model_max_length"
    warning: the ids are cut into model-sized windows afterwards, never fed whole.
    """
    if tokenizer is None:
        raise ValueError("raw text needs a tokenizer; pass tokenizer=... (e.g. the model's)")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty; nothing to tokenize")
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = enc["input_ids"]
    if len(ids) and isinstance(ids[0], (list, tuple)):  # batched output of a single text
        ids = ids[0]
    out = torch.as_tensor(ids, dtype=torch.long)
    if out.numel() == 0:
        raise ValueError("text tokenized to zero tokens")
    return out


def check_token_ids(ids: torch.Tensor, vocab_size: Optional[int] = None, what: str = "token ids"):
    """Return ``ids`` as int64 after checking dtype, emptiness and value range."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"token ids must be integers, got {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError(f"{what} are empty")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        raise ValueError(f"{what} contain a negative id ({lo})")
    if vocab_size is not None and hi >= vocab_size:
        raise ValueError(f"{what} contain id {hi} >= vocab_size={vocab_size}")
    return ids.long()


def _is_path(text) -> bool:
    """Whether ``text`` names an existing file or folder; False where the OS cannot even look it up
    (a name too long or holding a NUL byte: raw text passed where a path could stand)."""
    try:
        return Path(text).exists()
    except (OSError, ValueError):
        return False


def _files_of(path: Path) -> List[Path]:
    """The file itself, or the supported files under a directory (recursively, sorted). Hidden
    files and folders (``.ipynb_checkpoints``, ``.git``) are left out: their copies of the same
    text would be read twice."""
    if not _is_path(path):
        raise FileNotFoundError(f"{str(path)[:200]!r} does not exist (to use raw text, pass a "
                                "list of strings; a str is read as a path)")
    if path.is_file():
        return [path]
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        raise ValueError(f"{path} is a folder written by datasets' save_to_disk: load it with "
                         "datasets.load_from_disk(path) and pass the Dataset")
    known = TEXT_SUFFIXES + tuple(DATASET_SUFFIXES)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"directory {path} holds no {'/'.join(known)} files (hidden files and "
                         "folders are left out)")
    return files


def _dataset_texts(ds, text_column: str, where: str) -> List[str]:
    if text_column not in ds.column_names:
        raise ValueError(f"{where} has no {text_column!r} column (columns: {ds.column_names}); "
                         "name the text column with text_column=... (CompileConfig, "
                         "calibration_tensor; --text-column on the command line)")
    texts = ds[text_column]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"column {text_column!r} of {where} must hold strings; row {bad} holds "
                         f"{type(texts[bad]).__name__} {texts[bad]!r:.60}")
    return list(texts)


def _read_dataset_file(f: Path, text_column: str) -> List[str]:
    import datasets

    kind = DATASET_SUFFIXES[f.suffix.lower()]
    try:
        ds = datasets.load_dataset(kind, data_files=str(f), split="train")
    except Exception as e:  # datasets wraps the parser's error; an empty file gives a bare StopIteration
        cause = e.__cause__ or e
        raise ValueError(f"could not read {f} as {kind}: {type(cause).__name__}: "
                         f"{str(cause)[:300] or 'the file is empty or holds no records'}") from e
    if len(ds) == 0:
        raise ValueError(f"{f} holds no records")
    return _dataset_texts(ds, text_column, str(f))


def _read_text_file(f: Path) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start}); re-encode it, "
                         "e.g. iconv -f latin1 -t utf-8") from None


def load_texts(source, text_column: str = "text") -> List[str]:
    """Texts of a local file or directory (.txt, .json, .jsonl, .parquet), or of several.

    JSON/Parquet go through ``datasets.load_dataset`` (records with a ``text_column`` field, or a
    JSON list of strings, which ``datasets`` exposes as a "text" column).
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    texts: List[str] = []
    seen = set()
    for src in sources:
        for f in _files_of(Path(src)):
            # a file named twice (or a folder and a file in it) would give duplicated windows
            if f.resolve() in seen:
                raise ValueError(f"{f} is given twice (directly or through a folder); each text "
                                 "may be named once")
            seen.add(f.resolve())
            suffix = f.suffix.lower()
            if suffix in TEXT_SUFFIXES:
                texts.append(_read_text_file(f))
            elif suffix in DATASET_SUFFIXES:
                texts.extend(_read_dataset_file(f, text_column))
            else:
                raise ValueError(f"unsupported file extension {f.suffix!r} of {f}; expected one of "
                                 f"{', '.join(TEXT_SUFFIXES + tuple(DATASET_SUFFIXES))}")
    return texts


def _texts_stream(texts: Sequence[str], tokenizer) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError("calibration data given as text needs a tokenizer; pass tokenizer=...")
    if not texts or not any(t.strip() for t in texts):
        raise ValueError("calibration text is empty")
    return tokenize_text(tokenizer, TEXT_SEPARATOR.join(texts))


def _as_stream(x, index: int) -> torch.Tensor:
    """One sequence of a list: a 1-D tensor, a (1, L) tensor or a list of ints."""
    if not isinstance(x, torch.Tensor):
        if not isinstance(x, (list, tuple)):
            raise TypeError(f"sequence {index} must be a token tensor, got {type(x).__name__}")
        x = torch.as_tensor(x)
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1:
        raise ValueError(f"sequence {index} must be 1-D or (1, L), got shape {tuple(x.shape)}")
    return x


def _from_dataset(ds, tokenizer, text_column: str) -> List[torch.Tensor]:
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(f"got a DatasetDict with splits {list(ds.keys())}; pick one, "
                        "e.g. calib_data=dsdict['train']")
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"unsupported {type(ds).__name__}; pass a datasets.Dataset (a streaming "
                        "dataset can be materialised with Dataset.from_list(list(ds.take(n))))")
    if len(ds) == 0:
        raise ValueError("calibration dataset is empty")
    if text_column in ds.column_names and (tokenizer is not None or "input_ids" not in ds.column_names):
        return [_texts_stream(_dataset_texts(ds, text_column, "dataset"), tokenizer)]
    if "input_ids" in ds.column_names:
        return [_as_stream(list(ids), i) for i, ids in enumerate(ds["input_ids"])]
    raise ValueError(f"dataset has neither a {text_column!r} nor an 'input_ids' column "
                     f"(columns: {ds.column_names})")


def _streams(calib_data, tokenizer, text_column: str) -> List[torch.Tensor]:
    """Normalise every accepted form into a list of 1-D token streams (not yet validated)."""
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dim() != 2:
            raise ValueError("a calibration tensor must be 2-D (n, L), got shape "
                             f"{tuple(calib_data.shape)}; pass a list for 1-D sequences")
        if calib_data.numel() == 0:
            raise ValueError(f"calibration tensor is empty (shape {tuple(calib_data.shape)})")
        return list(calib_data)
    if isinstance(calib_data, (str, os.PathLike)):
        return [_texts_stream(load_texts(calib_data, text_column), tokenizer)]
    if isinstance(calib_data, (list, tuple)):
        if not calib_data:
            raise ValueError("calibration data is an empty list")
        if all(isinstance(x, str) for x in calib_data):
            if all("\n" not in x and _is_path(x) for x in calib_data):
                raise ValueError(f"the calibration strings are paths ({calib_data[0]!r}, ...), and a "
                                 "list of strings is read as raw text: pass pathlib.Path objects")
            return [_texts_stream(calib_data, tokenizer)]
        if all(isinstance(x, os.PathLike) for x in calib_data):
            return [_texts_stream(load_texts(calib_data, text_column), tokenizer)]
        if any(isinstance(x, (str, os.PathLike)) for x in calib_data):
            raise TypeError("a calibration list must hold only strings, only paths or only "
                            "token tensors, not a mix")
        return [_as_stream(x, i) for i, x in enumerate(calib_data)]
    if type(calib_data).__module__.startswith("datasets"):
        return _from_dataset(calib_data, tokenizer, text_column)
    raise TypeError(f"unsupported calibration data of type {type(calib_data).__name__}; expected a "
                    "token tensor, a list of token tensors or strings, a path, or a datasets.Dataset")


def calibration_tensor(calib_data, tokenizer=None, *, seqlen: int, n_samples: Optional[int] = None,
                       seed: int = 0, text_column: str = "text",
                       vocab_size: Optional[int] = None) -> torch.Tensor:
    """Calibration windows as a LongTensor of shape (n, seqlen).

    Every source is cut into non-overlapping windows of ``seqlen`` (a 2-D tensor row by row, so a
    (4, 1024) tensor gives 8 windows at seqlen 512; a row shorter than seqlen is an error). With
    ``n_samples``, that many windows are drawn without replacement by a ``torch.Generator`` seeded
    with ``seed`` and returned in their original order; asking for more windows than exist raises
    rather than silently calibrating on less.
    """
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen <= 0:
        raise ValueError(f"seqlen={seqlen!r} must be a positive integer")
    if n_samples is not None and (not isinstance(n_samples, int) or isinstance(n_samples, bool)
                                  or n_samples <= 0):
        raise ValueError(f"n_samples={n_samples!r} must be a positive integer or None")
    if (isinstance(calib_data, torch.Tensor) and calib_data.dim() == 2
            and 0 < calib_data.shape[1] < seqlen):
        raise ValueError(f"calibration tensor rows have L={calib_data.shape[1]} tokens, fewer than "
                         f"seqlen={seqlen}")
    streams = _streams(calib_data, tokenizer, text_column)
    windows = []
    for i, s in enumerate(streams):
        s = check_token_ids(s, vocab_size, what=f"sequence {i}" if len(streams) > 1 else "token ids")
        if s.numel() < seqlen:
            raise ValueError(f"sequence {i} has {s.numel()} tokens, fewer than seqlen={seqlen} (each "
                             "sequence is cut into windows of its own, so none crosses a document; "
                             "join short ones first, e.g. [torch.cat(rows)])")
        n = s.numel() // seqlen
        windows.append(s[: n * seqlen].view(n, seqlen))
    out = torch.cat(windows)
    n_tokens = sum(s.numel() for s in streams)
    if n_samples is not None:
        if n_samples > out.shape[0]:
            raise ValueError(f"n_samples={n_samples} windows of seqlen={seqlen} requested, but the "
                             f"calibration data ({n_tokens:,} tokens) gives only {out.shape[0]}")
        if n_samples < out.shape[0]:
            gen = torch.Generator().manual_seed(seed)
            pick = torch.randperm(out.shape[0], generator=gen)[:n_samples].sort().values
            out = out[pick]
    log.info("calibration: %d windows x %d tokens (from %s tokens in %d sequence(s))",
             out.shape[0], seqlen, f"{n_tokens:,}", len(streams))
    return out.contiguous()
