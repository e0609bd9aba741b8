"""Image generation with classifier-free guidance and per-prompt seeds.

Each prompt's initial latent is drawn on the CPU from ``torch.Generator().manual_seed(seed)``,
as the reference evaluation scripts do, so an image depends on its own seed only: not on the
batch it was generated in, on sharding or on resuming. Prompts are given as text or as text
states (for continuous attacks); the unconditional states come from the same, possibly
erased, text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
) -> torch.Tensor:
    """Denoise from each seed's latent under ``text_states``; return images (batch x 3 x H x W), unclamped."""
    device = model.device
    scheduler = make_scheduler(model, sampling.sampler)
    scheduler.set_timesteps(sampling.steps)

    latents = initial_latents(model, seeds, sampling.resolution).to(device, model.dtype)
    latents = latents * scheduler.init_noise_sigma
    unconditional = model.encode_prompts([""]).expand(len(seeds), -1, -1)
    states = torch.cat([unconditional, text_states.to(device, unconditional.dtype)])
    guidance = torch.tensor(guidance_scales, device=device, dtype=latents.dtype).view(-1, 1, 1, 1)

    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
        noise = model.predict_noise(model_input, timestep, states)
        noise_unconditional, noise_text = noise.chunk(2)
        noise = noise_unconditional + guidance * (noise_text - noise_unconditional)
        latents = scheduler.step(noise, timestep, latents).prev_sample

    return model.decode_latents(latents)


def generate(
    model: ModelHandle,
    seeds: list[int],
    guidance_scales: list[float],
    sampling: Sampling,
    prompts: list[str] | None = None,
    text_states: torch.Tensor | None = None,
    batch_size: int = 8,
    batch_invariant: bool = True,
) -> list[np.ndarray]:
    """Generate one image per seed, from prompts or from text states, in batches.

    With ``batch_invariant`` each prompt runs alone (its conditional and unconditional
    branches together), so images are bit-identical whatever the batch size.

    Returns float32 arrays (H x W x 3) in about [0, 1], not yet clamped or quantised, so that
    the validity check can see NaN and infinite values.
    """
    if (prompts is None) == (text_states is None):
        raise ValueError("pass exactly one of prompts and text_states")
    count = len(seeds)
    if len(guidance_scales) != count or (prompts is not None and len(prompts) != count):
        raise ValueError("prompts, seeds and guidance scales must have the same length")

    if batch_invariant:
        batch_size = 1
    images: list[np.ndarray] = []
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        if prompts is not None:
            states = model.encode_prompts(prompts[start:stop])
        else:
            states = text_states[start:stop]
        batch = sample(model, states, seeds[start:stop], guidance_scales[start:stop], sampling)
        images.extend(image.permute(1, 2, 0).float().cpu().numpy() for image in batch)
    return images


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] and quantise to 8-bit RGB, as a PNG stores it."""
    return (np.nan_to_num(image, nan=0.0).clip(0, 1) * 255).round().astype(np.uint8)
