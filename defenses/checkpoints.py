"""Published erased weights from local files: AdvUnlearn's text encoders and ESD's UNets.

Supported inputs:

- a diffusers component folder (``config.json`` with ``model.safetensors``,
  ``diffusion_pytorch_model.safetensors`` or their ``.bin`` forms, sharded or not), such as
  the subfolders of AdvUnlearn's release on Hugging Face (``nudity_unlearned`` and others);
- a state dict file (``.safetensors``, or a torch file read with ``weights_only=True``), such
  as ESD's ``diffusers-<concept>-ESDx1-UNET.pt`` (a full diffusers UNet state dict) or the
  AdvUnlearn repository's ``TextEncoder-*.pt``. Those wrap the encoder so that each key appears
  twice, under ``text_encoder.text_model.*`` and under the aliases ``embedding.*``,
  ``encoder.*`` and ``final_layer_norm.*``; the ``text_encoder.text_model.*`` copy is used.

Keys must match the target component exactly (the non-persistent ``position_ids`` buffer
aside). A mismatch is an error that names the component the keys seem to belong to, so a
UNet file is never silently loaded as a text encoder. Pickled code is never run.

Use them with ``--defense checkpoint --set defense.path=FILE_OR_FOLDER``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmark.config import ConfigError, bounds, config_to_dict
from benchmark.models.checkpoints import CheckpointError, load_state_dict
from benchmark.models.handle import COMPONENTS, ModelHandle
from benchmark.plugins import Defense, ErasureContext

LOADABLE_COMPONENTS = ("text_encoder", "unet")
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin")
# Prefixes of the original (CompVis/LDM) single-file layout of a whole model.
ORIGINAL_LAYOUT_PREFIXES = {"model.diffusion_model.": "unet", "cond_stage_model.transformer.": "text_encoder",
                            "first_stage_model.": "vae"}
WRAPPER_PREFIX = "text_encoder.text_model."
IGNORED_KEYS = ("embeddings.position_ids",)


# ----------------------------------------------------------------------------------------
# Reading


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a state dict file or of a diffusers component folder."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return _read_file(path)


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_state_dict(path)
    except SafetensorError as error:
        raise CheckpointError(f"failed to read {path} as safetensors ({error}); the file is truncated or corrupt, "
                              "so download it again") from error


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model_index.json").exists():
        raise CheckpointError(
            f"{folder} is a whole pipeline folder; pass its text_encoder/ or unet/ subfolder, or load the "
            "whole model with --model"
        )

    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_read_file(folder / shard))
            return state
        if (folder / name).exists():
            return _read_file(folder / name)
    raise CheckpointError(f"no weight file in {folder}; expected one of {', '.join(WEIGHT_FILES)} "
                          "(a diffusers or transformers component folder)")


def folder_or_file_sha256(path: str | Path) -> str:
    """Hash a weight file, or every weight file of a folder, by name and bytes."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")) \
        if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------
# Key layouts


def text_encoder_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map AdvUnlearn wrapper keys and ``text_model.``-prefixed keys to transformers 5 ``CLIPTextModel`` names."""
    if any(key.startswith(WRAPPER_PREFIX) for key in state):
        return {key.removeprefix(WRAPPER_PREFIX): value for key, value in state.items() if key.startswith(WRAPPER_PREFIX)}
    if state and all(key.startswith("text_model.") for key in state):
        return {key.removeprefix("text_model."): value for key, value in state.items()}
    return dict(state)


def normalized_keys(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    state = text_encoder_keys(state) if component == "text_encoder" else dict(state)
    return {key: value for key, value in state.items() if key not in IGNORED_KEYS}


def _target_keys(model: ModelHandle, component: str) -> set[str]:
    return {key for key in getattr(model, component).state_dict() if key not in IGNORED_KEYS}


def guess_component(state: dict[str, torch.Tensor], model: ModelHandle) -> str | None:
    """Return the component whose keys the checkpoint's keys overlap most (at least half), or None."""
    for prefix, component in ORIGINAL_LAYOUT_PREFIXES.items():
        if any(key.startswith(prefix) for key in state):
            return f"original-layout {component}"

    best, best_share = None, 0.0
    for component in COMPONENTS:
        keys = set(normalized_keys(state, component))
        share = len(keys & _target_keys(model, component)) / max(len(keys), 1)
        if share > best_share:
            best, best_share = component, share
    return best if best_share >= 0.5 else None


def _examples(keys: set[str]) -> str:
    return ", ".join(sorted(keys)[:3])


def check_keys(state: dict[str, torch.Tensor], model: ModelHandle, component: str, source: str,
               raw: dict[str, torch.Tensor]) -> None:
    """Raise ``CheckpointError`` unless ``state`` has exactly the keys and shapes of the model's ``component``."""
    target = getattr(model, component).state_dict()
    target_keys = _target_keys(model, component)
    missing = target_keys - set(state)
    unexpected = set(state) - target_keys
    if missing or unexpected:
        message = (f"{source} does not fit the model's {component}: {len(missing)} of its {len(target_keys)} weights "
                   f"are missing (e.g. {_examples(missing) or '-'}) and {len(unexpected)} keys are unexpected "
                   f"(e.g. {_examples(unexpected) or '-'}).")
        guess = guess_component(raw, model)
        if guess and guess.startswith("original-layout"):
            message += (f" Its keys are those of an {guess} in the original single-file layout of a whole model; "
                        "load that file with --model instead.")
        elif guess and guess != component:
            message += f" Its keys look like a {guess} checkpoint; pass component={guess}."
        else:
            message += " It does not look like a checkpoint of this model's architecture."
        raise CheckpointError(message)

    wrong_shapes = [f"{key} {tuple(state[key].shape)} (expected {tuple(target[key].shape)})"
                    for key in sorted(state) if state[key].shape != target[key].shape]
    if wrong_shapes:
        raise CheckpointError(f"{source} does not fit the model's {component}: {len(wrong_shapes)} weights have "
                              f"other shapes, e.g. {'; '.join(wrong_shapes[:3])}")


def load_component_weights(path: str | Path, model: ModelHandle,
                           component: str = "auto") -> tuple[str, dict[str, torch.Tensor]]:
    """Read a published checkpoint and check it against ``model``; return (component, state dict).

    ``component`` is "text_encoder", "unet" or "auto" (decided from the keys).
    """
    if component not in ("auto",) + LOADABLE_COMPONENTS:
        raise ValueError(f"invalid component {component!r}; valid: auto, {', '.join(LOADABLE_COMPONENTS)}")

    raw = read_weights(path)
    if not raw:
        raise CheckpointError(f"{path} contains no tensors")
    if component == "auto":
        guess = guess_component(raw, model)
        if guess not in LOADABLE_COMPONENTS:
            found = f"its keys match the {guess}" if guess else f"its keys (e.g. {_examples(set(raw))}) match none"
            raise CheckpointError(f"cannot tell which component {path} belongs to: {found}. Pass a text-encoder or "
                                  "UNet checkpoint, or set component explicitly")
        component = guess

    state = normalized_keys(raw, component)
    check_keys(state, model, component, str(path), raw)
    dtype = getattr(model, component).dtype
    return component, {key: value.to(dtype) for key, value in state.items()}


def load_text_encoder_weights(path: str | Path, model: ModelHandle) -> dict[str, torch.Tensor]:
    """Read an erased text encoder (e.g. AdvUnlearn's) for ``model``; keys as in ``model.text_encoder``."""
    return load_component_weights(path, model, "text_encoder")[1]


def load_unet_weights(path: str | Path, model: ModelHandle) -> dict[str, torch.Tensor]:
    """Read an erased UNet state dict (e.g. ESD's) for ``model``; keys as in ``model.unet``."""
    return load_component_weights(path, model, "unet")[1]


# ----------------------------------------------------------------------------------------
# The defense


@dataclass
class CheckpointConfig:
    """Location and component of the published erased weights."""

    # A state dict file or a diffusers component folder.
    path: str = ""
    component: str = field(default="auto", metadata=bounds(choices=("auto",) + LOADABLE_COMPONENTS))


class PublishedCheckpoint(Defense):
    """Published erased weights (AdvUnlearn text encoder, ESD UNet) loaded from a local file or folder."""

    name = "checkpoint"
    version = "1"
    Config = CheckpointConfig

    def _path(self) -> Path:
        if not self.config.path:
            raise ConfigError("defense.path is missing: set it to the erased checkpoint, "
                              "e.g. --set defense.path=nudity_unlearned/")
        path = Path(self.config.path).expanduser()
        if not path.exists():
            raise ConfigError(f"defense.path {path} does not exist")
        return path

    def describe(self) -> dict:
        """Name, version, settings and the weights' sha256, so a changed file is a new erasure."""
        return {"name": self.name, "version": self.version, "config": config_to_dict(self.config),
                "weights_sha256": folder_or_file_sha256(self._path())}

    def erase(self, model: ModelHandle, context: ErasureContext) -> dict[str, dict[str, torch.Tensor]]:
        component, state = load_component_weights(self._path(), model, self.config.component)
        current = getattr(model, component).state_dict()
        changed = {key: value for key, value in state.items() if not torch.equal(value, current[key])}
        return {component: changed}
