"""Paths and bytes: atomic writes, safe checkpoint read/write, sha256, cached downloads, safe archive extraction."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import torch

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or of the wrong kind; the message names the file."""


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path`` and rename it over ``path`` only if the block succeeds.

    Readers therefore see either the old complete file or the new complete file, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary name, then rename: a crash mid-write leaves any previous file intact."""
    with atomic_write(path) as handle:
        torch.save(obj, handle)


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Any:
    """Load a ``torch.save`` file with ``weights_only=True`` (never full pickle); clear errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / corrupt / unsafe files
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            " (the file may be truncated, corrupt, or contain objects that are not plain tensors/containers)"
        ) from exc


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file of any supported kind: ``.safetensors`` or a torch pickle (``.bin``/``.pt``/``.pth``).

    A torch file may hold a bare state dict or the reference's ``{"model": state_dict}``; the inner dict is returned.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def sha256sum(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so memory stays constant."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
