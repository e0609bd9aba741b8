"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023).

ESD fine-tunes the UNet so that, under the concept prompt c, it predicts what the frozen
original predicts with negative guidance away from c:

    target = eps*(x_t, "", t) - eta * (eps*(x_t, c, t) - eps*(x_t, "", t))
    loss   = mean((eps_theta(x_t, c, t) - target)^2)

Defaults follow the paper-era script ``train-scripts/train-esd.py`` of
github.com/rohitgandikota/erasing (commit a2189e9): eta 1, Adam at lr 1e-5, 1,000
iterations of batch 1, x_t from a partial 50-step DDIM run with guidance 3 by the model
being trained. That script labels x_t with a timestep about 40-58 DDPM steps noisier than
x_t really is (see ``draw_training_timestep``). The offset is the default because every
published ESD model and AdvUnlearn's training were made with it. ``timestep_labelling:
consistent`` queries the UNet at the latent's own timestep instead, and ``sample_with:
original`` generates x_t with the frozen model, as ESD's 2025 script does.

The three plug-ins differ only in the UNet parameters they train:

- ``esd-x``: the cross-attention (``attn2``) parameters; the paper uses it for styles.
- ``esd-u``: everything except the cross-attention, the time-embedding MLP and the output
  head. Norms and conv_in are included, as in the paper-era ``noxattn``. The paper uses it
  for nudity and objects.
- ``esd-full``: every UNet parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from benchmark.config import bounds
from benchmark.models.handle import ModelHandle
from benchmark.plugins import Defense, ErasureContext
from defenses._common import (
    TIMESTEP_LABELLINGS, ResumableTraining, changed_weights, draw_training_timestep, esd_loss, latent_shape,
    make_trainable, sample_partial_ddim, training_scheduler, unet_parameter_names,
)


@dataclass
class ESDConfig:
    """ESD's settings; defaults are those of the paper-era reference script."""

    # eta: strength of the negative guidance in the target.
    negative_guidance: float = field(default=1.0, metadata=bounds(min=0))
    iterations: int = field(default=1000, metadata=bounds(min=1))
    lr: float = field(default=1e-5, metadata=bounds(min=0))
    # Latents per iteration; they share the stop index and timestep. The reference uses 1.
    batch_size: int = field(default=1, metadata=bounds(min=1))
    # Classifier-free guidance scale of the partial DDIM run that produces x_t.
    start_guidance: float = 3.0
    ddim_steps: int = field(default=50, metadata=bounds(min=2))
    timestep_labelling: str = field(default="reference", metadata=bounds(choices=TIMESTEP_LABELLINGS))
    # "trained": x_t comes from the model being fine-tuned (reference); "original": from the frozen model.
    sample_with: str = field(default="trained", metadata=bounds(choices=("trained", "original")))
    # Training image size in pixels; 0 uses the model's resolution (512 for SD v1.4).
    resolution: int = field(default=0, metadata=bounds(min=0))
    # Steps between resumable checkpoints in the erasure's work folder; 0 saves none.
    checkpoint_every: int = field(default=200, metadata=bounds(min=0, result_neutral=True))


class ESD(Defense):
    """ESD base class; the plug-ins are esd-x, esd-u and esd-full."""

    version = "1"
    Config = ESDConfig
    parameter_set: ClassVar[str] = "full"

    # Called as step_callback(step, loss) after each step; raising from it interrupts training.
    step_callback: Callable[[int, float], None] | None = None

    def erase(self, model: ModelHandle, context: ErasureContext) -> dict[str, dict[str, torch.Tensor]]:
        config = self.config
        original = context.original
        phrase = context.concept.erase_phrase

        names = unet_parameter_names(model.unet, self.parameter_set)
        parameters = make_trainable(model.unet, names)
        optimizer = torch.optim.Adam(parameters.values(), lr=config.lr)

        with torch.no_grad():
            concept_states = original.encode_prompts([phrase]).expand(config.batch_size, -1, -1)
            empty_states = original.encode_prompts([""])
        scheduler = training_scheduler(model, config.ddim_steps)
        sampler = model if config.sample_with == "trained" else original
        shape = latent_shape(model, config.batch_size, config.resolution)

        def train_step(step: int, generator: torch.Generator) -> float:
            point = draw_training_timestep(scheduler, generator, config.timestep_labelling)
            noise = torch.randn(shape, generator=generator)
            latents = sample_partial_ddim(sampler, scheduler, noise, point.denoise_timesteps, concept_states,
                                          empty_states, config.start_guidance)

            timesteps = torch.full((config.batch_size,), point.timestep, device=model.device, dtype=torch.long)
            loss = esd_loss(model, original, latents, timesteps, concept_states, concept_states,
                            empty_states.expand(config.batch_size, -1, -1), config.negative_guidance)

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.item()

        training = ResumableTraining.for_erasure(
            self.name, context, config, parameters=parameters, optimizer=optimizer, total_steps=config.iterations,
            fingerprint={"concept": phrase, "method": self.name}, step_callback=self.step_callback,
        )
        training.run(train_step)
        model.unet.requires_grad_(False)
        return {"unet": changed_weights(model.unet, original.unet, names)}


class ESDCrossAttention(ESD):
    """ESD-x: fine-tune the UNet's cross-attention to erase a concept (suited to styles)."""

    name = "esd-x"
    parameter_set = "xattn"


class ESDUnconditional(ESD):
    """ESD-u: fine-tune the UNet outside cross-attention to erase a concept (suited to nudity and objects)."""

    name = "esd-u"
    parameter_set = "noxattn"


class ESDFull(ESD):
    """ESD-full: fine-tune every UNet parameter to erase a concept."""

    name = "esd-full"
    parameter_set = "full"
