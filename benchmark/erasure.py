"""Erased weights, trained once per (base model, defense, config, concept) and cached by content hash.

A defense returns only the weights it changed, ``{component: {name: tensor}}``. They are saved
as ``erased.safetensors`` (keys ``component/name``) with the resolved config beside them, and
every attack on the same erased model reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from benchmark.models.checkpoints import load_state_dict, save_state_dict
from benchmark.models.handle import COMPONENTS, ModelHandle

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "erased.safetensors"
CONFIG_FILE = "erasure.json"


def erasure_key(base_hashes: dict[str, str], defense: dict, concept: dict, seed: int) -> str:
    source = json.dumps({"base": base_hashes, "defense": defense, "concept": concept, "seed": seed}, sort_keys=True)
    return hashlib.sha256(source.encode()).hexdigest()


def flatten(changed: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    flat = {}
    for component, state in changed.items():
        if component not in COMPONENTS:
            raise ValueError(f"a defense changed the unknown component {component!r}; valid: {', '.join(COMPONENTS)}")
        for name, tensor in state.items():
            flat[f"{component}/{name}"] = tensor
    return flat


def apply_erased_weights(model: ModelHandle, flat: dict[str, torch.Tensor]) -> None:
    """Copy changed weights into ``model``; every name must exist with the same shape."""
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        component, _, name = key.partition("/")
        by_component.setdefault(component, {})[name] = tensor

    for component, state in by_component.items():
        module = getattr(model, component)
        own = module.state_dict()
        for name, tensor in state.items():
            if name not in own:
                raise KeyError(f"erased weight {component}/{name} does not exist in the model's {component}")
            if own[name].shape != tensor.shape:
                raise ValueError(f"erased weight {component}/{name} has shape {tuple(tensor.shape)}, "
                                 f"the model's has {tuple(own[name].shape)}")
        module.load_state_dict(state, strict=False)
    model.forget_hashes()


class ErasureCacheError(RuntimeError):
    """Cached erased weights do not match the hash recorded when they were saved."""


def cached_erasure(cache_root: Path, key: str) -> dict[str, torch.Tensor] | None:
    from benchmark.prompts import file_sha256

    path = cache_root / key / WEIGHTS_FILE
    description = cache_root / key / CONFIG_FILE
    if not path.exists() or not description.exists():
        return None
    expected = json.loads(description.read_text()).get("weights_sha256")
    actual = file_sha256(path)
    if actual != expected:
        raise ErasureCacheError(
            f"cached erased weights {path} have sha256 {actual}, but {description.name} records {expected}; "
            f"delete the folder {path.parent} to train them again"
        )
    logger.info("reusing erased weights from %s", path)
    return load_state_dict(path)


def store_erasure(cache_root: Path, key: str, flat: dict[str, torch.Tensor], description: dict) -> Path:
    from benchmark.prompts import file_sha256

    folder = cache_root / key
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(flat, folder / WEIGHTS_FILE)
    # The description is written last: a folder without it is an unfinished erasure.
    description = {**description, "weights_sha256": file_sha256(folder / WEIGHTS_FILE)}
    temporary = folder / (CONFIG_FILE + ".tmp")
    temporary.write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    temporary.replace(folder / CONFIG_FILE)
    return folder
