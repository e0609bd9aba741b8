"""The model handle: the one view of an SD-style text-to-image model that every method uses.

Attacks, defenses and the runner reach the tokenizer, text encoder, UNet, VAE and noise
schedule through a ``ModelHandle``, never around it, so the same method code runs on Stable
Diffusion v1.4, on the embedded default world and on tiny random test models.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmark.tokenizer import MAX_LENGTH


@dataclass
class TokenizedPrompts:
    """Token ids padded to 77 positions, with each prompt's untruncated length."""

    input_ids: torch.Tensor
    lengths: list[int]

    @property
    def truncated(self) -> list[bool]:
        return [length > MAX_LENGTH for length in self.lengths]


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Hash a module's parameters and buffers by name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


COMPONENTS = ("text_encoder", "unet", "vae")


@dataclass
class ModelHandle:
    """An SD v1-style model: tokenizer, CLIP text encoder, UNet, VAE and the noise schedule."""

    name: str
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler_config: dict
    source: str
    resolution: int = 512
    default_sampler: str = "lms"
    default_steps: int = 50
    method_budgets: dict = field(default_factory=dict)
    _hashes: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------
    # Device and copies

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device) -> "ModelHandle":
        for component in COMPONENTS:
            getattr(self, component).to(device)
        return self

    def eval(self) -> "ModelHandle":
        for component in COMPONENTS:
            module = getattr(self, component)
            module.eval()
            module.requires_grad_(False)
        return self

    def copy(self) -> "ModelHandle":
        """Return an independent copy whose weights can be trained; the tokenizer is shared."""
        clone = copy.copy(self)
        for component in COMPONENTS:
            setattr(clone, component, copy.deepcopy(getattr(self, component)))
        clone._hashes = {}
        return clone

    def component_sha256(self, component: str) -> str:
        if component not in self._hashes:
            self._hashes[component] = state_dict_sha256(getattr(self, component))
        return self._hashes[component]

    def weights_sha256(self) -> dict[str, str]:
        return {component: self.component_sha256(component) for component in COMPONENTS}

    def forget_hashes(self) -> None:
        """Drop cached hashes after weights change."""
        self._hashes = {}

    # ------------------------------------------------------------------------------------
    # Text

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        """Tokenize to 77 ids per prompt, recording each prompt's length before truncation."""
        full = self.tokenizer(prompts, truncation=False, padding=False).input_ids
        padded = self.tokenizer(
            prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        return TokenizedPrompts(padded.to(self.device), [len(ids) for ids in full])

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        """The text encoder's word-embedding table E (vocabulary x width)."""
        return self.text_encoder.embeddings.token_embedding

    def encode_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the text states (batch x 77 x width) that condition the UNet."""
        return self.text_encoder(input_ids.to(self.device)).last_hidden_state

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.tokenize(prompts).input_ids)

    def encode_word_embeddings(self, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Run the text encoder on word embeddings (rows of E, before positions are added).

        Continuous and one-hot attacks use this path. It matches ``encode_ids`` when
        ``word_embeddings`` are the rows of E for those ids: positions are added, the layers
        run with the causal mask only, and the final layer norm is applied.
        """
        from transformers.masking_utils import create_causal_mask

        encoder = self.text_encoder
        hidden = encoder.embeddings(inputs_embeds=word_embeddings)
        mask = create_causal_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        states = encoder.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return encoder.final_layer_norm(states)

    # ------------------------------------------------------------------------------------
    # Latents and noise

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_size(self) -> int:
        return self.resolution // (2 ** (len(self.vae.config.block_out_channels) - 1))

    def latent_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        return (batch, self.unet.config.in_channels, self.latent_size, self.latent_size)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1] (batch x 3 x H x W) to scaled latents, using the posterior mean."""
        images = images.to(self.device, self.vae.dtype) * 2 - 1
        return self.vae.encode(images).latent_dist.mean * self.vae_scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map scaled latents to images in about [0, 1]; values are not clamped, so NaNs stay visible."""
        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae_scaling_factor).sample
        return (decoded.float() + 1) / 2

    def noise_scheduler(self):
        """A DDPM scheduler with the model's noise schedule, for training losses and attack losses."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction eps(x_t, t, c)."""
        return self.unet(latents, timesteps, encoder_hidden_states=text_states).sample
