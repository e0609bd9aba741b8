"""Image generation with classifier-free guidance and per-prompt seeds.

Each prompt's initial latent is drawn on the CPU from ``torch.Generator().manual_seed(seed)``,
as the reference evaluation scripts do, so an image depends on its own seed only: not on the
batch it was generated in, on sharding or on resuming. Prompts are given as text or as text
states (for continuous attacks); the unconditional states come from the same, possibly
erased, text encoder.

Speed options: ``precision`` runs the UNet and the VAE decoder under ``torch.autocast`` in
bf16 or fp16. A prompt whose image comes out with NaN or infinite values is generated again,
alone, in fp32, and ``GeneratedImage.precision_fallback`` records it. ``compile`` wraps the
UNet in ``torch.compile``. Attention runs through PyTorch's scaled-dot-product attention
already: diffusers' default processor, ``AttnProcessor2_0``, calls
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from benchmark.config import bounds
from benchmark.models.handle import ModelHandle

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddpm": "DDPMScheduler",
}

# Autocast dtype per precision; fp32 runs without autocast.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Speed options and their defaults. Run keys leave them out at these values, so the keys of runs
# made before the options existed stay valid.
SPEED_OPTION_DEFAULTS = {"precision": "fp32", "compile": False}


@dataclass
class GenerationConfig:
    """Sampler settings of a run; empty values take the model's defaults."""

    sampler: str = field(default="", metadata=bounds(choices=("",) + tuple(SAMPLERS)))
    steps: int = field(default=0, metadata=bounds(min=0))
    resolution: int = field(default=0, metadata=bounds(min=0))
    guidance_scale: float = field(default=-1.0)
    batch_size: int = field(default=8, metadata=bounds(min=1))
    # Batched float kernels differ from unbatched ones by about 1e-6, which can flip a pixel's
    # rounding; one prompt per UNet call makes every image independent of the batch size.
    batch_invariant: bool = True
    # fp32, or bf16 / fp16 autocast of the UNet and VAE decoder. It is meant for CUDA, and CPU
    # autocast runs too (the tests use it). A non-finite image is generated again in fp32.
    precision: str = field(default="fp32", metadata=bounds(choices=tuple(PRECISIONS)))
    # Wrap the UNet in torch.compile; the first call for each input shape compiles it.
    compile: bool = False


def image_settings(generation: dict) -> dict:
    """Return the generation settings that can change images, for run keys.

    ``batch_size`` is left out because images do not depend on it, and each speed option is
    left out while it has its default value.
    """
    return {
        key: value for key, value in generation.items()
        if key != "batch_size" and not (key in SPEED_OPTION_DEFAULTS and value == SPEED_OPTION_DEFAULTS[key])
    }


@dataclass
class GeneratedImage:
    """One generated image (float32, H x W x 3, about [0, 1]) and the precision that produced it."""

    pixels: np.ndarray
    precision: str
    # True when the image was non-finite under bf16 or fp16 and was generated again in fp32.
    precision_fallback: bool = False


@dataclass(frozen=True)
class Sampling:
    """Resolved sampler, steps and resolution for one model."""

    sampler: str
    steps: int
    resolution: int

    @classmethod
    def resolve(cls, config: GenerationConfig, defaults: "dict | ModelHandle") -> "Sampling":
        """Fill the config's empty values from a model handle or a ``generation_defaults`` dict."""
        if not isinstance(defaults, dict):
            defaults = {"default_sampler": defaults.default_sampler, "default_steps": defaults.default_steps,
                        "resolution": defaults.resolution}
        return cls(
            sampler=config.sampler or defaults["default_sampler"],
            steps=config.steps or defaults["default_steps"],
            resolution=config.resolution or defaults["resolution"],
        )


def make_scheduler(model: ModelHandle, sampler: str):
    import diffusers

    try:
        scheduler_class = getattr(diffusers, SAMPLERS[sampler])
    except KeyError:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}") from None
    return scheduler_class.from_config(model.scheduler_config)


def autocast(device: torch.device, precision: str):
    """Return the autocast context of ``precision`` on ``device``, a null context for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def noise_predictor(model: ModelHandle, compile_unet: bool = False) -> Callable:
    """Return ``f(latents, timesteps, text_states)`` giving the UNet's noise prediction.

    With ``compile_unet`` the UNet runs through ``torch.compile``. Dynamo keeps compiled code
    per UNet object, so wrapping the same UNet again does not compile it again.
    """
    if not compile_unet:
        return model.predict_noise
    compiled = torch.compile(model.unet)

    def predict(latents: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        return compiled(latents, timesteps, encoder_hidden_states=text_states).sample

    return predict


def initial_latents(model: ModelHandle, seeds: list[int], resolution: int) -> torch.Tensor:
    """Draw one initial latent per seed on the CPU, independent of the batch."""
    latent_size = resolution // (2 ** (len(model.vae.config.block_out_channels) - 1))
    shape = (1, model.unet.config.in_channels, latent_size, latent_size)
    latents = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.cat(latents)


@torch.no_grad()
def sample(
    model: ModelHandle,
    text_states: torch.Tensor,
    seeds: list[int],
    guidance_scales: list[float],
    sampling: Sampling,
    precision: str = "fp32",
    predict_noise: Callable | None = None,
    empty_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoise from each seed's latent under ``text_states``; return images (batch x 3 x H x W), unclamped.

    Under bf16 or fp16 only the UNet and the VAE decoder run in autocast. The text states,
    the guidance arithmetic and the sampler's latents stay in the model's dtype.
    ``predict_noise`` defaults to the model handle's UNet call, and ``empty_states`` (the
    empty prompt's text states, 1 x 77 x width) are encoded here when not given.
    """
    device = model.device
    predict_noise = predict_noise or model.predict_noise
    scheduler = make_scheduler(model, sampling.sampler)
    scheduler.set_timesteps(sampling.steps)

    latents = initial_latents(model, seeds, sampling.resolution).to(device, model.dtype)
    latents = latents * scheduler.init_noise_sigma
    if empty_states is None:
        empty_states = model.encode_prompts([""])
    unconditional = empty_states.expand(len(seeds), -1, -1)
    states = torch.cat([unconditional, text_states.to(device, unconditional.dtype)])
    guidance = torch.tensor(guidance_scales, device=device, dtype=latents.dtype).view(-1, 1, 1, 1)

    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
        with autocast(device, precision):
            noise = predict_noise(model_input, timestep, states)
        noise_unconditional, noise_text = noise.to(latents.dtype).chunk(2)
        noise = noise_unconditional + guidance * (noise_text - noise_unconditional)
        latents = scheduler.step(noise, timestep, latents).prev_sample

    with autocast(device, precision):
        return model.decode_latents(latents)


def generate(model: ModelHandle, seeds: list[int], guidance_scales: list[float], sampling: Sampling,
             **options) -> list[np.ndarray]:
    """Generate one image per seed, from prompts or from text states, in batches.

    Returns float32 arrays (H x W x 3) in about [0, 1], not yet clamped or quantised, so that
    the validity check can see NaN and infinite values. ``options`` are the keyword arguments of
    ``generate_images``, which also returns the precision of each image.
    """
    images = generate_images(model, seeds, guidance_scales, sampling, **options)
    return [image.pixels for image in images]


def generate_images(
    model: ModelHandle,
    seeds: list[int],
    guidance_scales: list[float],
    sampling: Sampling,
    prompts: list[str] | None = None,
    text_states: torch.Tensor | None = None,
    batch_size: int = 8,
    batch_invariant: bool = True,
    precision: str = "fp32",
    compile_unet: bool = False,
) -> list[GeneratedImage]:
    """Generate one image per seed, from prompts or from text states, in batches.

    With ``batch_invariant`` each prompt runs alone (its conditional and unconditional
    branches together), so images are bit-identical whatever the batch size.

    Under bf16 or fp16, an image with a NaN or infinite value is generated again alone in
    fp32. With ``batch_invariant`` that image then equals the one an fp32 run gives.
    """
    if (prompts is None) == (text_states is None):
        raise ValueError("pass exactly one of prompts and text_states")
    count = len(seeds)
    if len(guidance_scales) != count or (prompts is not None and len(prompts) != count):
        raise ValueError("prompts, seeds and guidance scales must have the same length")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")

    predict_noise = noise_predictor(model, compile_unet)
    # Encoded once for all batches: with batch_invariant every prompt is its own batch.
    with torch.no_grad():
        empty_states = model.encode_prompts([""])
    if batch_invariant:
        batch_size = 1
    images: list[GeneratedImage] = []
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        if prompts is not None:
            states = model.encode_prompts(prompts[start:stop])
        else:
            states = text_states[start:stop]
        batch = sample(model, states, seeds[start:stop], guidance_scales[start:stop], sampling, precision,
                       predict_noise, empty_states)
        for offset, image in enumerate(batch):
            index = start + offset
            generated = GeneratedImage(_to_array(image), precision)
            if precision != "fp32" and not torch.isfinite(image).all():
                retry = sample(model, states[offset : offset + 1], [seeds[index]], [guidance_scales[index]],
                               sampling, "fp32", predict_noise, empty_states)
                generated = GeneratedImage(_to_array(retry[0]), "fp32", precision_fallback=True)
            images.append(generated)
    return images


def _to_array(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).float().cpu().numpy()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] and quantise to 8-bit RGB, as a PNG stores it."""
    return (np.nan_to_num(image, nan=0.0).clip(0, 1) * 255).round().astype(np.uint8)
