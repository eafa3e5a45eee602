"""Checkpoint folders on disk: written atomically, read back verified.

A checkpoint is written into a hidden sibling folder, every file and the folder fsync'ed, and
only then renamed to its name (:func:`atomic_folder`). An existing checkpoint is moved aside
just before that rename and deleted after it, so a crash leaves either the old checkpoint or
the new one at the path (or, in the instant between the two renames, the old one complete under
``.<name>.old-*``), never a partial one. The manifest, which holds the tensor file's SHA-256, is written last.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

from .errors import CheckpointError
from .manifest import MANIFEST_FILE

log = logging.getLogger(__name__)

CHUNK = 1 << 22


def file_digest(path: Path) -> Tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def apply_umask(path: Path) -> None:
    """Give a file the permissions a plain ``open(path, "w")`` would have: temporary files
    (``tempfile.mkstemp``) and safetensors' writer create them readable by the owner only."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without error, make it ``path``
    (replacing an earlier checkpoint there; the files of that folder the new checkpoint does not
    write, e.g. a tokenizer or a README, are copied over first). On error the staging folder is
    deleted."""
    path = Path(path)
    if path.exists() and not _replaceable(path):
        raise CheckpointError(f"{path} exists and is not a pt2pass checkpoint; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    os.mkdir(tmp)
    old = None
    try:
        yield tmp
        for child in tmp.iterdir():
            apply_umask(child)
            fsync_file(child)
        if path.exists():
            _carry_over(path, tmp)
        _fsync_dir(tmp)
        if path.exists():
            old = _sibling(path, "old")
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
                old = None
            raise
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _carry_over(old: Path, new: Path) -> None:
    """Copy the entries of ``old`` that ``new`` lacks into ``new`` (copies, not moves: until the
    swap the old folder must stay a complete checkpoint)."""
    for child in old.iterdir():
        target = new / child.name
        if target.exists() or target.is_symlink():
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.copytree(child, target, symlinks=True)
        else:
            shutil.copy2(child, target, follow_symlinks=False)
            if not target.is_symlink():
                fsync_file(target)
        log.info("kept %s from the checkpoint folder being replaced", child.name)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def existing_file(folder: Path, name: str) -> Path:
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a complete pt2pass checkpoint")
    return path


def check_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint at {folder}: not a folder")
    return folder


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged file
        raise CheckpointError(f"{path.name} cannot be read as safetensors: {type(exc).__name__}: "
                              f"{exc}") from exc


def _replaceable(path: Path) -> bool:
    """Only an earlier checkpoint (or an empty folder) is ever replaced."""
    return path.is_dir() and ((path / MANIFEST_FILE).is_file() or not any(path.iterdir()))


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (not possible on every platform)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        log.debug("fsync of folder %s is not supported here", path)
    finally:
        os.close(fd)
