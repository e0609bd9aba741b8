"""Reading weight files safely: safetensors, or ``torch.load(weights_only=True)``; never pickled code."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A file is not a readable checkpoint, or its weights do not fit the target."""


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        header = handle.read(8)
        if len(header) < 8:
            return False
        (length,) = struct.unpack("<Q", header)
        if length <= 0 or length > 100_000_000:
            return False
        first = handle.read(1)
    return first == b"{"


def check_checkpoint_file(path: Path) -> None:
    """Raise ``CheckpointError`` unless ``path`` looks like a safetensors or torch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size < 16:
        raise CheckpointError(f"{path} is {path.stat().st_size} bytes long; it is not a checkpoint (truncated download?)")

    with open(path, "rb") as handle:
        start = handle.read(512)
    if start.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml")):
        raise CheckpointError(f"{path} is an HTML or XML page, not a checkpoint; download the file itself")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        if not _is_safetensors(path):
            raise CheckpointError(f"{path} has a .safetensors name but no valid safetensors header")
        return
    if not zipfile.is_zipfile(path) and not start.startswith(b"\x80"):
        raise CheckpointError(f"{path} is neither a safetensors file nor a torch checkpoint")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file, or a torch file with ``weights_only=True``."""
    path = Path(path)
    check_checkpoint_file(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"failed to read {path} as a weights-only torch checkpoint: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path} does not contain a flat dict of tensors")
    return state


def save_state_dict(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Write tensors as safetensors, atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    save_file(tensors, str(temporary), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    temporary.replace(path)
