"""AdvUnlearn: robust concept erasure by adversarial training (Zhang et al., NeurIPS 2024).

A bi-level method. Each iteration, an inner attack finds k continuous word embeddings that,
placed right after the start token of the concept prompt, make the current model predict
what the original model predicts for the concept. The outer step then applies ESD's
negatively guided loss to that adversarial prompt and adds gamma times a utility loss that
keeps the predictions for retain prompts ("a photo of <object>") unchanged:

    loss = mean((eps(z, t, tau_phi(P_adv)) - target)^2)
         + gamma * mean((eps(z_r, t, tau_phi(c_r)) - eps*(z_r, t, tau_phi0(c_r)))^2)

Defaults follow github.com/OPTML-Group/AdvUnlearn (commit 9d23124) and its maintainers'
statements on GitHub: the CLIP text encoder is trained (its 12 layers and the final
layer norm; embeddings frozen), Adam at lr 1e-5 for 1,000 iterations, 200 warm-up
iterations without attack, then one attack of 30 Adam steps at lr 1e-3 on k = 1 slot per
iteration, 5 retain prompts per iteration with gamma 0.3 for nudity and 0.5 for styles and
objects. Latents come from ESD's partial DDIM run (50 steps, guidance 3, the reference's
timestep labelling) conditioned by the frozen text encoder.

The reference code has three bugs; the defaults fix them, and a flag brings each one back:

- ``reference_word_count``: the prompt length used to place the adversarial slots is the
  number of words, not of tokens, so the second sub-token of a one-word, two-token concept
  ("nudity" = "nu" + "dity") drops out of the adversarial prompt.
- ``reference_gradient_accumulation``: the attack never resets the gradient of the
  adversarial embedding, so each Adam step gets the sum of all gradients of the round
  (and fast AT takes the sign of that sum, in place).
- ``reference_stale_attack``: the attack returns the prompt built before its last update,
  so the last of its steps is lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from benchmark.config import bounds
from benchmark.models.handle import ModelHandle
from benchmark.plugins import Defense, ErasureContext
from defenses._common import (
    TIMESTEP_LABELLINGS, UNET_PARAMETER_SETS, ResumableTraining, changed_weights, draw_training_timestep,
    epoch_batch, esd_loss, latent_shape, make_trainable, sample_partial_ddim,
    text_encoder_parameter_names, training_scheduler, unet_parameter_names,
)

logger = logging.getLogger(__name__)

TRAIN_METHODS = ("text_encoder_full",) + UNET_PARAMETER_SETS

# Retain-loss weight gamma by concept kind: the AdvUnlearn maintainers give 0.3 for nudity and
# 0.5 for styles and objects. Concepts of kind "other" get 0.5.
RETAIN_LOSS_WEIGHTS = {"nudity": 0.3, "style": 0.5, "object": 0.5, "other": 0.5}


@dataclass
class AdvUnlearnConfig:
    """AdvUnlearn's settings; defaults are those of the reference code and its README."""

    # "text_encoder_full" (reference default) or one of ESD's UNet parameter sets.
    train_method: str = field(default="text_encoder_full", metadata=bounds(choices=TRAIN_METHODS))
    iterations: int = field(default=1000, metadata=bounds(min=1))
    lr: float = field(default=1e-5, metadata=bounds(min=0))
    # Iterations at the start that train on the clean concept prompt, without attack.
    warmup_iterations: int = field(default=200, metadata=bounds(min=0))
    negative_guidance: float = field(default=1.0, metadata=bounds(min=0))
    start_guidance: float = 3.0
    ddim_steps: int = field(default=50, metadata=bounds(min=2))
    timestep_labelling: str = field(default="reference", metadata=bounds(choices=TIMESTEP_LABELLINGS))
    # Which UNet produces the training latents; the same one unless the UNet is trained.
    sample_with: str = field(default="trained", metadata=bounds(choices=("trained", "original")))
    resolution: int = field(default=0, metadata=bounds(min=0))
    # Retain prompts per iteration, and their loss weight gamma (None: by concept kind).
    retain_batch: int = field(default=5, metadata=bounds(min=1))
    retain_loss_weight: float | None = field(default=None, metadata=bounds(min=0))
    # Inner attack: "pgd" is a plain Adam step (no projection), "fast_at" uses the gradient's sign.
    attack_method: str = field(default="pgd", metadata=bounds(choices=("pgd", "fast_at")))
    attack_steps: int = field(default=30, metadata=bounds(min=1))
    attack_lr: float = field(default=1e-3, metadata=bounds(min=0))
    # Adversarial slots k, placed right after the start token.
    adversarial_tokens: int = field(default=1, metadata=bounds(min=1))
    # "latest" starts each attack from the previous adversarial embedding, "random" from random tokens.
    attack_init: str = field(default="latest", metadata=bounds(choices=("latest", "random")))
    # Iterations between attacks; in between the last adversarial prompt is reused.
    attack_every: int = field(default=1, metadata=bounds(min=1))
    # Replace the adversarial embedding by the nearest vocabulary token embeddings (L2) after each attack.
    project_to_vocabulary: bool = False
    reference_word_count: bool = False
    reference_gradient_accumulation: bool = False
    reference_stale_attack: bool = False
    checkpoint_every: int = field(default=200, metadata=bounds(min=0, result_neutral=True))


def prompt_length(model: ModelHandle, phrase: str, word_count: bool = False) -> int:
    """Count the prompt tokens that the adversarial slots follow: BPE tokens, or words as the reference does."""
    if word_count:
        return len(phrase.split())
    return model.tokenize([phrase]).lengths[0] - 2


def insert_adversarial_prefix(word_embeddings: torch.Tensor, adversarial: torch.Tensor, length: int) -> torch.Tensor:
    """Place ``adversarial`` (k x width) after the start token of a 77-position prompt of ``length`` tokens.

    The prompt's positions are cut into [start, prompt, k positions, rest]; the k positions
    after the prompt (its first end-of-text slots when ``length`` is the token count) are
    dropped so that the sequence keeps 77 positions: start, adversarial, prompt, rest.
    """
    slots = adversarial.shape[0]
    positions = word_embeddings.shape[1]
    if 1 + length + slots > positions:
        raise ValueError(f"a prompt of {length} tokens leaves no room for {slots} adversarial tokens "
                         f"in {positions} positions; shorten the concept phrase or lower adversarial_tokens")

    start = word_embeddings[:, :1]
    prompt = word_embeddings[:, 1 : 1 + length]
    rest = word_embeddings[:, 1 + length + slots :]
    return torch.cat([start, adversarial.unsqueeze(0).to(word_embeddings.dtype), prompt, rest], dim=1)


def nearest_token_embeddings(embeddings: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Replace each row by the nearest row of the token-embedding table (Euclidean distance)."""
    indices = torch.cdist(embeddings.float(), table.float()).argmin(dim=1)
    return table[indices].to(embeddings.dtype)


def utility_loss(trainee: ModelHandle, original: ModelHandle, latents: torch.Tensor, timesteps: torch.Tensor,
                 retain_ids: torch.Tensor, original_states: torch.Tensor) -> torch.Tensor:
    """AdvUnlearn's utility loss: the trained model's prediction for retain prompts stays the original's."""
    with torch.no_grad():
        target = original.predict_noise(latents, timesteps, original_states)
    prediction = trainee.predict_noise(latents, timesteps, trainee.encode_ids(retain_ids))
    return F.mse_loss(prediction, target)


def attack_loss(trainee: ModelHandle, latents: torch.Tensor, timesteps: torch.Tensor, adversarial_states: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
    """The inner attack's loss: the current model under the adversarial prompt should predict ``target``.

    ``target`` is the original model's prediction for the concept, eps*(x_t, c, t).
    """
    return F.mse_loss(trainee.predict_noise(latents, timesteps, adversarial_states), target)


class AdvUnlearn(Defense):
    """AdvUnlearn: adversarial training of the text encoder against soft-prompt attacks (robust erasure)."""

    name = "advunlearn"
    version = "1"
    Config = AdvUnlearnConfig

    # Called as step_callback(step, loss) after each step; raising from it interrupts training.
    step_callback: Callable[[int, float], None] | None = None

    def retain_loss_weight(self, kind: str) -> float:
        if self.config.retain_loss_weight is not None:
            return self.config.retain_loss_weight
        return RETAIN_LOSS_WEIGHTS.get(kind, RETAIN_LOSS_WEIGHTS["other"])

    def erase(self, model: ModelHandle, context: ErasureContext) -> dict[str, dict[str, torch.Tensor]]:
        config = self.config
        original = context.original
        concept = context.concept
        phrase = concept.erase_phrase
        gamma = self.retain_loss_weight(concept.kind)

        retain_prompts = self._retain_prompts(context, gamma)
        component = "text_encoder" if config.train_method == "text_encoder_full" else "unet"
        module = getattr(model, component)
        if component == "text_encoder":
            names = text_encoder_parameter_names(module, config.train_method)
        else:
            names = unet_parameter_names(module, config.train_method)
        parameters = make_trainable(module, names)
        optimizer = torch.optim.Adam(parameters.values(), lr=config.lr)

        state = _AdversarialState(model, original, config, phrase, context.seed)
        scheduler = state.scheduler

        def train_step(step: int, generator: torch.Generator) -> float:
            attacking = step >= config.warmup_iterations
            if attacking and (step - config.warmup_iterations) % config.attack_every == 0:
                state.adversarial = self.attack(model, original, state, generator)

            point = draw_training_timestep(scheduler, generator, config.timestep_labelling)
            retain_indices = epoch_batch(len(retain_prompts), config.retain_batch, step, context.seed, "retain")
            retain_batch = [retain_prompts[index] for index in retain_indices] if gamma > 0 else []
            latents, retain_latents, retain_ids, retain_states = state.training_latents(
                point, retain_batch, generator)
            timesteps = torch.full((1,), point.timestep, device=model.device, dtype=torch.long)

            if attacking and state.adversarial is not None:
                trainee_states = model.encode_word_embeddings(state.adversarial_prompt(model, state.adversarial))
            else:
                trainee_states = model.encode_ids(state.concept_ids)
            loss = esd_loss(model, original, latents, timesteps, trainee_states, state.concept_states,
                            state.empty_states, config.negative_guidance)
            if retain_batch:
                retain_timesteps = timesteps.expand(len(retain_batch))
                loss = loss + gamma * utility_loss(model, original, retain_latents, retain_timesteps, retain_ids,
                                                   retain_states)

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.item()

        training = ResumableTraining.for_erasure(
            self.name, context, config, parameters=parameters, optimizer=optimizer, total_steps=config.iterations,
            fingerprint={"concept": phrase, "gamma": gamma, "retain": retain_prompts, "method": self.name},
            extra_state=(state.save, state.load), step_callback=self.step_callback,
        )
        training.run(train_step)
        module.requires_grad_(False)
        return {component: changed_weights(module, getattr(original, component), names)}

    def _retain_prompts(self, context: ErasureContext, gamma: float) -> list[str]:
        if gamma == 0:
            return [""]
        if context.retain_prompts is None or not context.retain_prompts.records:
            raise ValueError(
                f"AdvUnlearn's utility loss needs retain prompts, but the concept {context.concept.name!r} has "
                "none; add a 'retain:' prompt file to the concept or set defense.retain_loss_weight=0"
            )
        return [record.prompt for record in context.retain_prompts.records]

    def attack(self, model: ModelHandle, original: ModelHandle, state: "_AdversarialState",
               generator: torch.Generator) -> torch.Tensor:
        """Run the inner soft-prompt attack; return the adversarial embedding (k x width)."""
        config = self.config
        adversarial = state.initial_adversarial(generator).requires_grad_(True)
        optimizer = torch.optim.Adam([adversarial], lr=config.attack_lr)
        accumulated = torch.zeros_like(adversarial)
        before_last_update = adversarial.detach().clone()

        for _ in range(config.attack_steps):
            point = draw_training_timestep(state.scheduler, generator, config.timestep_labelling)
            latents, _, _, _ = state.training_latents(point, [], generator)
            timesteps = torch.full((1,), point.timestep, device=model.device, dtype=torch.long)
            with torch.no_grad():
                target = original.predict_noise(latents, timesteps, state.concept_states)

            states = model.encode_word_embeddings(state.adversarial_prompt(model, adversarial))
            loss = attack_loss(model, latents, timesteps, states, target)
            (gradient,) = torch.autograd.grad(loss, adversarial)

            if config.reference_gradient_accumulation:
                accumulated = accumulated + gradient
                gradient = accumulated
            if config.attack_method == "fast_at":
                gradient = gradient.sign()
                if config.reference_gradient_accumulation:
                    accumulated = gradient
            adversarial.grad = gradient
            before_last_update = adversarial.detach().clone()
            optimizer.step()

        result = before_last_update if config.reference_stale_attack else adversarial.detach().clone()
        if config.project_to_vocabulary:
            result = nearest_token_embeddings(result, model.token_embedding.weight.detach())
        return result


class _AdversarialState:
    """The prompts, frozen conditioning and latest adversarial embedding of one AdvUnlearn run."""

    def __init__(self, model: ModelHandle, original: ModelHandle, config: AdvUnlearnConfig, phrase: str,
                 seed: int) -> None:
        self.model = model
        self.original = original
        self.config = config
        self.scheduler = training_scheduler(model, config.ddim_steps)
        self.sampler = model if config.sample_with == "trained" else original
        self.shape = latent_shape(model, 1, config.resolution)

        self.concept_ids = model.tokenize([phrase]).input_ids
        self.length = prompt_length(model, phrase, config.reference_word_count)
        with torch.no_grad():
            self.concept_states = original.encode_ids(self.concept_ids)
            self.empty_states = original.encode_prompts([""])
            self.concept_embeddings = model.token_embedding(self.concept_ids)
        self.adversarial: torch.Tensor | None = None

    def adversarial_prompt(self, model: ModelHandle, adversarial: torch.Tensor) -> torch.Tensor:
        """Build the concept prompt's word embeddings with the adversarial slots after the start token."""
        return insert_adversarial_prefix(self.concept_embeddings, adversarial, self.length)

    def initial_adversarial(self, generator: torch.Generator) -> torch.Tensor:
        """Return the attack's start: the latest adversarial embedding, or the embeddings of random tokens."""
        if self.config.attack_init == "latest" and self.adversarial is not None:
            return self.adversarial.detach().clone()
        table = self.model.token_embedding.weight.detach()
        token_ids = torch.randint(table.shape[0], (self.config.adversarial_tokens,), generator=generator)
        return table[token_ids.to(table.device)].clone()

    def training_latents(self, point, retain_prompts: list[str], generator: torch.Generator):
        """Sample the concept latent and the retain latents in one partial DDIM run.

        Returns (concept latent, retain latents, retain token ids, retain states of the frozen encoder).
        """
        count = 1 + len(retain_prompts)
        noise = torch.randn((count,) + self.shape[1:], generator=generator)
        states = self.concept_states
        retain_ids = retain_states = None
        if retain_prompts:
            retain_ids = self.model.tokenize(retain_prompts).input_ids
            with torch.no_grad():
                retain_states = self.original.encode_ids(retain_ids)
            states = torch.cat([states, retain_states])

        latents = sample_partial_ddim(self.sampler, self.scheduler, noise, point.denoise_timesteps, states,
                                      self.empty_states, self.config.start_guidance)
        return latents[:1], latents[1:], retain_ids, retain_states

    def save(self) -> dict[str, torch.Tensor]:
        return {} if self.adversarial is None else {"adversarial": self.adversarial}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        adversarial = tensors.get("adversarial")
        self.adversarial = None if adversarial is None else adversarial.to(self.model.device, self.model.dtype)
