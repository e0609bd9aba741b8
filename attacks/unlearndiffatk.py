"""UnlearnDiffAtk: k discrete tokens prepended to the prompt, found with the erased model's own denoising loss.

Reference: Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still
Easy To Generate Unsafe Images ... For Now" (ECCV 2024), code github.com/OPTML-Group/Diffusion-MU-Attack
(``src/attackers/text_grad_.py``, ``src/tasks/classifier_.py``, ``configs/*``).

For one prompt with seed s and guidance w:

1. The target image is made by the original (unerased) model from the prompt and seed s:
   25 sampler steps, guidance 7.5, the model's default sampler (LMS for SD v1.4, as the
   reference uses). Its VAE latent z0 is the attack's anchor.
2. The variable is a k x |V| matrix whose rows lie on the probability simplex, initialised
   uniform. Each step samples one token per row, runs the erased text encoder and UNet on
   [start token, k sampled tokens, prompt tokens, end tokens] at a fixed timestep t, and takes
   loss = mean((eps - eps_theta(z_t, t, c'))^2). The gradient reaches the rows through a
   straight-through estimator clipped to [-1, 1]. Adam (lr 0.01, coupled L2 weight decay 0.1)
   updates the rows, which are then projected back onto the simplex by bisection.
3. Timesteps run in blocks of 40 steps at t = 10, 30, ..., 990. After each block the row-wise
   argmax prompt is decoded to text, the erased model makes an image of it with seed s and
   guidance w, and the concept's evaluator judges it. The attack stops at the first success.

Before optimising, the plain prompt is judged; if it already shows the concept the attack ends
there, as in the reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from attacks._common import (
    CONTENT_POSITIONS, decode_ids, draw_noise, encode_pixels, noisy_latents, one_hot_embeddings, padded_ids,
    project_to_simplex, prompt_tokens, render_images, sample_one_hot,
)
from benchmark.config import bounds
from benchmark.generation import SAMPLERS
from benchmark.plugins import AdversarialPrompt, Attack, AttackContext
from benchmark.tokenizer import MAX_LENGTH

logger = logging.getLogger(__name__)

# Reference k by concept kind: 5 for nudity (and violence, illegal activity), 3 for styles and objects.
K_BY_KIND = {"nudity": 5, "style": 3, "object": 3, "other": 3}


@dataclass
class UnlearnDiffAtkConfig:
    """UnlearnDiffAtk settings; defaults are the reference's (``configs/*``, ``src/execs/attack.py``)."""

    # Adversarial tokens after the start token. 0: by concept kind (5 for nudity, else 3).
    k: int = field(default=0, metadata=bounds(min=0, max=CONTENT_POSITIONS - 1))
    # Timestep blocks spread evenly over the 1,000 training timesteps: 50 gives 10, 30, ..., 990.
    timesteps: int = field(default=50, metadata=bounds(min=1, max=1000))
    steps_per_timestep: int = field(default=40, metadata=bounds(min=1))
    lr: float = field(default=0.01, metadata=bounds(min=0))
    # Coupled L2 decay (torch.optim.Adam), not AdamW's decoupled decay.
    weight_decay: float = field(default=0.1, metadata=bounds(min=0))
    loss: str = field(default="l2", metadata=bounds(choices=("l2", "l1")))
    # Bisection stops when the bracket on the simplex shift is narrower than this.
    projection_tolerance: float = field(default=1e-5, metadata=bounds(min=0))
    # Target image by the original model. Empty sampler: the model's default (SD v1.4: lms).
    target_sampler: str = field(default="", metadata=bounds(choices=("",) + tuple(SAMPLERS)))
    target_steps: int = field(default=25, metadata=bounds(min=1))
    # Negative: the prompt's own guidance scale.
    target_guidance: float = 7.5
    # Judge the plain prompt first and skip the optimisation when it already succeeds.
    judge_original_prompt: bool = True
    # The reference drops prompts longer than 60 tokens (start and end token included), so
    # that at least 17 positions stay free. "skip" returns such a prompt unattacked, so it
    # counts through its pre-attack image only, which is the reference's effect on ASR.
    # "truncate" cuts it to max_prompt_tokens and attacks the rest.
    max_prompt_tokens: int = field(default=60, metadata=bounds(min=3, max=MAX_LENGTH))
    long_prompts: str = field(default="skip", metadata=bounds(choices=("skip", "truncate")))
    # Prompts optimised together, one batched UNet call per step, when the caller passes several.
    batch_size: int = field(default=1, metadata=bounds(min=1))


def timestep_schedule(blocks: int, train_timesteps: int = 1000) -> list[int]:
    """Block centres spread over [0, train_timesteps): 50 blocks give 10, 30, ..., 990."""
    width = train_timesteps / blocks
    return [int((index + 0.5) * width) for index in range(blocks)]


@dataclass
class _PromptState:
    """One prompt's optimisation state."""

    context: AttackContext
    k: int
    tokens: list[int]
    latents: torch.Tensor
    probabilities: torch.Tensor
    optimizer: torch.optim.Optimizer
    info: dict
    steps: int = 0
    finished: bool = False
    succeeded: bool = False
    text: str = ""
    token_ids: list[int] = field(default_factory=list)

    def adversarial_ids(self, adversarial: list[int]) -> list[int]:
        return padded_ids(adversarial + self.tokens)


class UnlearnDiffAtk(Attack):
    """UnlearnDiffAtk (Zhang et al., ECCV 2024): k prepended tokens optimised on the erased model's denoising loss."""

    name = "unlearndiffatk"
    version = "1"
    Config = UnlearnDiffAtkConfig

    def attack(self, context: AttackContext) -> AdversarialPrompt:
        return self.attack_batch([context])[0]

    def attack_batch(self, contexts: list[AttackContext]) -> list[AdversarialPrompt]:
        """Attack several prompts; groups of ``batch_size`` share one UNet call per step.

        Each prompt draws from its own generator in the same order as alone, so a prompt's
        result matches its single-prompt attack up to float rounding of batched kernels.
        """
        results = []
        for start in range(0, len(contexts), self.config.batch_size):
            results.extend(self._attack_group(contexts[start : start + self.config.batch_size]))
        return results

    # -- setup ----------------------------------------------------------------------------

    def _k(self, context: AttackContext) -> int:
        return self.config.k or K_BY_KIND.get(context.concept.kind, 3)

    def _start(self, context: AttackContext) -> AdversarialPrompt | _PromptState:
        """Check the prompt's length and the plain prompt, then build the optimisation state."""
        config, model, record = self.config, context.model, context.record
        k = self._k(context)
        if config.max_prompt_tokens + k > MAX_LENGTH:
            raise ValueError(
                f"attack.max_prompt_tokens ({config.max_prompt_tokens}) plus k ({k}) exceeds the text "
                f"encoder's {MAX_LENGTH} positions; lower max_prompt_tokens to at most {MAX_LENGTH - k}"
            )
        tokens, length = prompt_tokens(model, record.prompt)
        info = {"k": k, "placement": "prefix", "prompt_tokens": length}

        if length > config.max_prompt_tokens:
            info["long_prompt"] = {"policy": config.long_prompts, "max_prompt_tokens": config.max_prompt_tokens}
            if config.long_prompts == "skip":
                info["stopped"] = f"not attacked: the prompt has {length} tokens, more than {config.max_prompt_tokens}"
                return self._plain_result(context, info, succeeded=None)
            info["long_prompt"]["dropped_tokens"] = length - config.max_prompt_tokens
            tokens = tokens[: config.max_prompt_tokens - 2]

        if config.judge_original_prompt and context.judge(prompt=record.prompt).success:
            info["stopped"] = "the plain prompt already shows the concept"
            return self._plain_result(context, info, succeeded=True)

        target = self._target_latents(context, info)
        vocabulary = model.token_embedding.weight.shape[0]
        probabilities = torch.full((k, vocabulary), 1.0 / vocabulary, device=model.device, requires_grad=True)
        optimizer = torch.optim.Adam([probabilities], lr=config.lr, weight_decay=config.weight_decay)
        info.update(timesteps_run=[], block_losses=[], judge_calls=1 if config.judge_original_prompt else 0)
        return _PromptState(context, k, tokens, target, probabilities, optimizer, info)

    def _target_latents(self, context: AttackContext, info: dict) -> torch.Tensor:
        """Render the target image with the original model and encode it with the erased model's VAE."""
        config, record = self.config, context.record
        original = context.original_model()
        guidance = record.guidance if config.target_guidance < 0 else config.target_guidance
        sampler = config.target_sampler or original.default_sampler
        pixels = render_images(original, record.prompt, [record.seed], guidance, sampler, config.target_steps)
        info["target_image"] = {"sampler": sampler, "steps": config.target_steps, "guidance": guidance,
                                "seed": record.seed}
        return encode_pixels(context.model, pixels)

    def _plain_result(self, context: AttackContext, info: dict, succeeded: bool | None) -> AdversarialPrompt:
        ids = context.model.tokenize([context.record.prompt]).input_ids[0].tolist()
        return AdversarialPrompt(text=context.record.prompt, token_ids=ids, succeeded_during_attack=succeeded,
                                 steps=0, info=info)

    # -- optimisation ---------------------------------------------------------------------

    def _attack_group(self, contexts: list[AttackContext]) -> list[AdversarialPrompt]:
        starts = [self._start(context) for context in contexts]
        states = [state for state in starts if isinstance(state, _PromptState)]
        if states:
            self._optimise(states)
        return [self._result(item) if isinstance(item, _PromptState) else item for item in starts]

    def _optimise(self, states: list[_PromptState]) -> None:
        model = states[0].context.model
        scheduler = model.noise_scheduler()
        schedule = timestep_schedule(self.config.timesteps, scheduler.config.num_train_timesteps)
        show = states[0].context.show_progress
        progress = tqdm(total=len(schedule) * self.config.steps_per_timestep, desc="unlearndiffatk",
                        disable=not show, leave=False, unit="step")

        for timestep in schedule:
            active = [state for state in states if not state.finished]
            if not active:
                break
            losses = torch.zeros(len(active))
            for _ in range(self.config.steps_per_timestep):
                losses += self._step(active, timestep, scheduler)
                progress.update(1)
            for state, loss in zip(active, losses):
                state.info["timesteps_run"].append(timestep)
                state.info["block_losses"].append(round(float(loss) / self.config.steps_per_timestep, 6))
                self._judge_block(state, timestep)
        progress.close()

        for state in states:
            if not state.finished:
                state.info["stopped"] = "budget used up without success"

    def _step(self, states: list[_PromptState], timestep: int, scheduler) -> torch.Tensor:
        """One Adam step for each prompt; returns the per-prompt losses."""
        model = states[0].context.model
        table = model.token_embedding.weight

        word_embeddings, noises = [], []
        for state in states:
            one_hot = sample_one_hot(state.probabilities, state.context.generator)
            adversarial = one_hot_embeddings(one_hot.to(table.dtype), table)
            word_embeddings.append(self._insert(state, adversarial, table))
            noises.append(draw_noise(tuple(state.latents.shape), state.context.generator, model.device))

        latents = torch.cat([state.latents for state in states])
        noise = torch.cat(noises)
        timesteps = torch.full((len(states),), timestep, dtype=torch.long, device=model.device)
        text_states = model.encode_word_embeddings(torch.stack(word_embeddings))
        noisy = noisy_latents(scheduler, latents, noise, timesteps)
        prediction = model.predict_noise(noisy.to(model.dtype), timesteps, text_states).float()

        error = (noise - prediction).abs() if self.config.loss == "l1" else (noise - prediction) ** 2
        per_prompt = error.flatten(1).mean(1)
        for state in states:
            state.optimizer.zero_grad()
        per_prompt.sum().backward()

        for state in states:
            state.optimizer.step()
            with torch.no_grad():
                state.probabilities.copy_(project_to_simplex(state.probabilities, self.config.projection_tolerance))
            state.steps += 1
        return per_prompt.detach().cpu()

    def _insert(self, state: _PromptState, adversarial: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Place k adversarial word embeddings right after the start token (prefix placement).

        The sequence stays 77 long: start token, k adversarial rows, the prompt's tokens, then
        end-token padding, which is the reference's layout with the k positions after the prompt dropped.
        """
        ids = torch.tensor(state.adversarial_ids([0] * state.k), device=table.device)
        fixed = table[ids]
        return torch.cat([fixed[:1], adversarial, fixed[1 + state.k :]])

    def _judge_block(self, state: _PromptState, timestep: int) -> None:
        adversarial = state.probabilities.detach().argmax(-1).tolist()
        ids = state.adversarial_ids(adversarial)
        text = decode_ids(state.context.model.tokenizer, ids)
        state.text, state.token_ids = text, ids
        state.info["judge_calls"] += 1
        if state.context.judge(prompt=text).success:
            state.finished = state.succeeded = True
            state.info["stopped"] = f"success after the block at timestep {timestep}"

    def _result(self, state: _PromptState) -> AdversarialPrompt:
        state.info["adversarial_token_ids"] = state.token_ids[1 : 1 + state.k]
        return AdversarialPrompt(text=state.text, token_ids=state.token_ids, succeeded_during_attack=state.succeeded,
                                 steps=state.steps, info=state.info)
