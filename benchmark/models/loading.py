"""Load SD-style models from a registered name, a local folder, a single file or the HF cache.

Nothing here downloads. A Hugging Face id resolves only from the local cache, and every
failure names where the loader looked and how to supply the missing files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from benchmark.models.handle import ModelHandle
from benchmark.tokenizer import build_sd_tokenizer, check_sd_tokenizer

logger = logging.getLogger(__name__)

SD14_REPO_ID = "CompVis/stable-diffusion-v1-4"
SD14_NAMES = ("sd-v1-4", "sd14", SD14_REPO_ID)
SD14_PATH_VARIABLE = "SD14_PATH"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded."""


# ----------------------------------------------------------------------------------------
# Components


def _load_tokenizer(folder: Path):
    tokenizer_dir = folder / "tokenizer"
    has_files = any((tokenizer_dir / name).is_file() for name in ("vocab.json", "tokenizer.json"))
    if not has_files:
        logger.info("no tokenizer files in %s; building the SD v1 tokenizer from open_clip's vocabulary", folder)
        return build_sd_tokenizer()

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    check_sd_tokenizer(tokenizer, str(tokenizer_dir))
    return tokenizer


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelLoadError(
            f"missing {what}: {path} does not exist. A model folder needs the diffusers layout "
            "(model_index.json, unet/, vae/, text_encoder/, scheduler/), as written by "
            "StableDiffusionPipeline.save_pretrained or `hf download CompVis/stable-diffusion-v1-4`"
        )
    return path


def load_diffusers_folder(folder: str | Path, name: str | None = None, dtype=torch.float32, **settings) -> ModelHandle:
    """Load a local diffusers ``StableDiffusionPipeline`` folder, component by component."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    _require(folder / "model_index.json", "model_index.json")
    scheduler_file = _require(folder / "scheduler" / "scheduler_config.json", "scheduler config")

    logger.info("loading the model from %s", folder)
    try:
        text_encoder = CLIPTextModel.from_pretrained(
            str(_require(folder / "text_encoder", "text encoder")), dtype=dtype, local_files_only=True
        )
        # low_cpu_mem_usage=False: the default needs the optional accelerate package and warns without it.
        unet = UNet2DConditionModel.from_pretrained(
            str(_require(folder / "unet", "UNet")), torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=False
        )
        vae = AutoencoderKL.from_pretrained(
            str(_require(folder / "vae", "VAE")), torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"failed to load the model in {folder}: {error}") from error

    settings = {**_folder_defaults(folder, unet, vae), **settings}
    handle = ModelHandle(
        name=name or folder.name,
        tokenizer=_load_tokenizer(folder),
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler_config=json.loads(scheduler_file.read_text()),
        source=str(folder.resolve()),
        **settings,
    )
    return handle.eval()


def native_resolution(unet, vae) -> int:
    """The image size a UNet was trained for: latent sample size x VAE downsampling, as diffusers infers it."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def _folder_defaults(folder: Path, unet, vae) -> dict:
    """Resolution from the configs, and sampler and steps from an optional ``generation_defaults.json``."""
    defaults = {"resolution": native_resolution(unet, vae)}
    path = folder / "generation_defaults.json"
    if path.exists():
        stored = json.loads(path.read_text())
        defaults.update({key: stored[key] for key in ("default_sampler", "default_steps") if key in stored})
    return defaults


def load_single_file(path: str | Path, config_dir: str | Path | None = None, dtype=torch.float32) -> ModelHandle:
    """Load an original-layout ``.ckpt`` or ``.safetensors`` checkpoint with a local config folder."""
    from diffusers import StableDiffusionPipeline

    from benchmark.models.checkpoints import check_checkpoint_file

    path = Path(path)
    check_checkpoint_file(path)
    if config_dir is None:
        config_dir = _shipped_sd14_configs()

    logger.info("loading the single-file checkpoint %s with configs from %s", path, config_dir)
    try:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, tokenizer=build_sd_tokenizer(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False, torch_dtype=dtype,
        )
    except Exception as error:
        raise ModelLoadError(f"failed to load the checkpoint {path} with configs from {config_dir}: {error}") from error

    handle = ModelHandle(
        name=path.stem,
        tokenizer=pipeline.tokenizer,
        text_encoder=pipeline.text_encoder,
        unet=pipeline.unet,
        vae=pipeline.vae,
        scheduler_config=dict(pipeline.scheduler.config),
        source=str(path.resolve()),
        resolution=native_resolution(pipeline.unet, pipeline.vae),
    )
    return handle.eval()


def _shipped_sd14_configs() -> Path:
    """Return a configs-only SD v1.4 folder, writing it to the user cache on first use."""
    from benchmark.models.sd_configs import write_sd14_config_folder
    from benchmark.paths import cache_dir

    folder = cache_dir() / "sd-v1-4-configs"
    if not (folder / "model_index.json").exists():
        write_sd14_config_folder(folder)
    return folder


def _hub_cache_folder(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as error:
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and this "
            "suite never downloads. Supply it in one of these ways: download it on a networked machine with "
            f"`hf download {repo_id}` and copy the cache over; pass a local diffusers folder or a single "
            f".ckpt/.safetensors file to --model; or set {SD14_PATH_VARIABLE} to such a path."
        ) from error


def load_sd14(dtype=torch.float32) -> ModelHandle:
    """Load Stable Diffusion v1.4 from $SD14_PATH or the local HF cache, with the reference protocol."""
    settings = dict(resolution=512, default_sampler="lms", default_steps=50)
    override = os.environ.get(SD14_PATH_VARIABLE)
    if override:
        path = Path(override)
        if path.is_dir():
            return load_diffusers_folder(path, name="sd-v1-4", dtype=dtype, **settings)
        if path.is_file():
            handle = load_single_file(path, dtype=dtype)
            handle.name = "sd-v1-4"
            return handle
        raise ModelLoadError(f"{SD14_PATH_VARIABLE}={override} is neither a folder nor a file")
    return load_diffusers_folder(_hub_cache_folder(SD14_REPO_ID), name="sd-v1-4", dtype=dtype, **settings)


# ----------------------------------------------------------------------------------------
# Random models for tests


def build_random_model(unet_config: dict, vae_config: dict, text_config: dict, *, name: str, seed: int = 0,
                       resolution: int, scheduler_config: dict | None = None, **settings) -> ModelHandle:
    """Build an SD-architecture model with seeded random weights from component configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmark.models.sd_configs import SD14_SCHEDULER

    torch.manual_seed(seed)
    handle = ModelHandle(
        name=name,
        tokenizer=build_sd_tokenizer(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        unet=UNet2DConditionModel(**unet_config),
        vae=AutoencoderKL(**vae_config),
        scheduler_config=dict(scheduler_config or SD14_SCHEDULER),
        source=f"random weights (seed {seed})",
        resolution=resolution,
        **settings,
    )
    return handle.eval()


TINY_GENERATION_DEFAULTS = {"resolution": 64, "default_sampler": "ddim", "default_steps": 4}


def build_tiny_model(seed: int = 0) -> ModelHandle:
    """A tiny random SD-architecture model (64 x 64 images, 8 x 8 latents) for fast tests."""
    from benchmark.models import sd_configs

    return build_random_model(
        sd_configs.TINY_UNET, sd_configs.TINY_VAE, sd_configs.TINY_TEXT_ENCODER,
        name="tiny-random", seed=seed, **TINY_GENERATION_DEFAULTS,
    )


build_tiny_model.generation_defaults = TINY_GENERATION_DEFAULTS


def build_sd14_random(seed: int = 0) -> ModelHandle:
    """Full-size SD v1.4 architecture with random weights (about 1.1 B parameters; slow on CPU)."""
    from benchmark.models import sd_configs

    return build_random_model(
        sd_configs.SD14_UNET, sd_configs.SD14_VAE, sd_configs.SD14_TEXT_ENCODER,
        name="sd-v1-4-random", seed=seed, **SD14_GENERATION_DEFAULTS,
    )


# ----------------------------------------------------------------------------------------
# Entry point


SD14_GENERATION_DEFAULTS = {"resolution": 512, "default_sampler": "lms", "default_steps": 50}


def _defaults_from_configs(folder: Path) -> dict:
    """Read a model folder's generation defaults from its config files, without loading weights."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    defaults = dict(SD14_GENERATION_DEFAULTS)
    defaults["resolution"] = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    path = folder / "generation_defaults.json"
    if path.exists():
        stored = json.loads(path.read_text())
        defaults.update({key: stored[key] for key in ("default_sampler", "default_steps") if key in stored})
    return defaults


def generation_defaults(spec: str, config_dir: str | Path | None = None) -> dict:
    """Return a model's resolution, sampler and steps without loading its weights.

    Run keys include them, so a run folder is never resumed under other sampling settings.
    """
    from benchmark.paths import WORLD_WEIGHTS_DIR
    from benchmark.registry import MODELS

    if spec == "world":
        return _defaults_from_configs(WORLD_WEIGHTS_DIR)
    if spec in MODELS:
        return dict(getattr(MODELS.get(spec), "generation_defaults", SD14_GENERATION_DEFAULTS))
    if spec in SD14_NAMES:
        return dict(SD14_GENERATION_DEFAULTS)
    path = Path(spec)
    if path.is_dir() and (path / "unet" / "config.json").exists():
        return _defaults_from_configs(path)
    if path.is_file():
        return _defaults_from_configs(Path(config_dir)) if config_dir else dict(SD14_GENERATION_DEFAULTS)
    return dict(SD14_GENERATION_DEFAULTS)


def locate_model(spec: str) -> str:
    """Say where ``spec`` would load from, without loading weights; raise ``ModelLoadError`` if nowhere."""
    from benchmark.paths import WORLD_WEIGHTS_DIR
    from benchmark.registry import MODELS

    if spec == "world":
        if not (WORLD_WEIGHTS_DIR / "model_index.json").exists():
            raise ModelLoadError(f"the default world's weights are missing from {WORLD_WEIGHTS_DIR}")
        return str(WORLD_WEIGHTS_DIR)
    if spec in SD14_NAMES:
        override = os.environ.get(SD14_PATH_VARIABLE)
        if override:
            if not Path(override).exists():
                raise ModelLoadError(f"{SD14_PATH_VARIABLE}={override} is neither a folder nor a file")
            return override
        return str(_hub_cache_folder(SD14_REPO_ID))
    if spec in MODELS:
        return f"registered model {spec!r} (built in code)"
    if Path(spec).exists():
        return str(Path(spec).resolve())
    if "/" in spec and not spec.startswith((".", "/")) and spec.count("/") == 1:
        return str(_hub_cache_folder(spec))
    raise ModelLoadError(
        f"model {spec!r} not found: it is not a registered model ({', '.join(MODELS.names())}), "
        "a local folder or file, or a Hugging Face id"
    )


def load_model(spec: str, device: str = "cpu", config_dir: str | Path | None = None) -> ModelHandle:
    """Load a model by registered name, local folder, single checkpoint file or cached HF id.

    ``config_dir`` is the diffusers config folder of a single-file checkpoint (default: SD v1.4's).
    """
    from benchmark.registry import MODELS

    if spec in MODELS:
        handle = MODELS.get(spec)()
    elif spec in SD14_NAMES:
        handle = load_sd14()
    elif Path(spec).is_dir():
        handle = load_diffusers_folder(spec)
    elif Path(spec).is_file():
        handle = load_single_file(spec, config_dir)
    elif "/" in spec and not spec.startswith((".", "/")) and spec.count("/") == 1:
        handle = load_diffusers_folder(_hub_cache_folder(spec), name=spec)
    else:
        raise ModelLoadError(
            f"model {spec!r} not found: it is not a registered model ({', '.join(MODELS.names())}), "
            "a local folder or file, or a Hugging Face id"
        )
    return handle.to(device)
