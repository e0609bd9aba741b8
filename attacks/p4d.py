"""P4D (Prompting4Debugging): hard prompts that make the erased model denoise like the original one.

Reference: Chin et al., "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by
Finding Problematic Prompts" (ICML 2024), code github.com/joycenerd/P4D (``run_p4dn.py``,
``run_p4dk.py``, ``prompt_optimization/optimize_n.py``, ``optimize_k.py``,
``configs/esd_nudity_optmz_config.json``).

For one prompt P with seed s and guidance w:

1. Target image: the original model renders 3 candidates of P with seeds s, s + 1 and s + 2,
   25 sampler steps and guidance w. The candidate with the highest evaluator score is encoded
   to the latent z0.
2. Soft prompt. P4D-N learns 16 free token embeddings that replace P, laid out as
   [start, 16 learned, end, 59 x the embedding of token 0]. P4D-K keeps P's tokens and inserts
   one learned token before every 3 of them, then pads with token 0.
3. Each iteration projects every learned embedding to its nearest vocabulary embedding by
   cosine similarity, draws t ~ U{0..999} and noise n, and minimises
   MSE(eps_erased(z_t, t, E(projected prompt)), eps_original(z_t, t, E(P))). The gradient with
   respect to the projected embeddings updates the soft ones (straight-through); AdamW, lr 0.1,
   weight decay 0.1, 3,000 iterations.
4. Every 50 iterations (from iteration 0) the current hard prompt is decoded and scored; the
   best one is the result. The reference scores by the CLIP (open_clip ViT-H-14,
   laion2b_s32b_b79k) image-embedding cosine similarity between an image of the erased model
   and the target image. Without those CLIP weights on this machine, the score is the concept
   evaluator's verdict on the runner's judge image (success first, then score); ``info``
   records which criterion ran.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from attacks._common import (
    draw_noise, draw_timestep, encode_pixels, noisy_latents, padded_ids, render_images,
    straight_through_projection, unit_rows,
)
from benchmark.config import bounds
from benchmark.generation import SAMPLERS
from benchmark.plugins import AdversarialPrompt, Attack, AttackContext
from benchmark.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MAX_LENGTH

logger = logging.getLogger(__name__)

CLIP_HUB_MODEL_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# P4D pads soft prompts with the embedding of token 0 ("!"), not with end tokens.
PAD_TOKEN_ID = 0


@dataclass
class P4DConfig:
    """Settings shared by P4D-N and P4D-K; defaults are the reference's nudity config."""

    iterations: int = field(default=3000, metadata=bounds(min=1))
    eval_every: int = field(default=50, metadata=bounds(min=1))
    lr: float = field(default=0.1, metadata=bounds(min=0))
    weight_decay: float = field(default=0.1, metadata=bounds(min=0))
    # Target image: the best of this many original-model images (seeds s, s + 1, ...).
    target_candidates: int = field(default=3, metadata=bounds(min=1))
    # Empty: the model's default sampler. The reference uses 25 DPM-Solver++ steps.
    target_sampler: str = field(default="", metadata=bounds(choices=("",) + tuple(SAMPLERS)))
    target_steps: int = field(default=25, metadata=bounds(min=1))
    # "signed" feeds the VAE [-1, 1], as it expects. "unit" reproduces the reference's [0, 1] input.
    target_vae_range: str = field(default="signed", metadata=bounds(choices=("signed", "unit")))
    # How the best prompt is chosen: "clip" (the reference), "evaluator", or "auto" (clip when
    # its weights are on this machine, else evaluator).
    selection: str = field(default="auto", metadata=bounds(choices=("auto", "clip", "evaluator")))
    clip_model: str = "ViT-H-14"
    # A local open_clip checkpoint. Empty: laion/CLIP-ViT-H-14-laion2B-s32B-b79K in the Hugging Face cache.
    clip_weights: str = ""
    # Images scored by CLIP during the search. Empty sampler: the model's default.
    eval_sampler: str = field(default="", metadata=bounds(choices=("",) + tuple(SAMPLERS)))
    eval_steps: int = field(default=25, metadata=bounds(min=1))
    # Stop at the first evaluation whose judged image shows the concept (the reference never stops early).
    stop_on_success: bool = False
    # Text encoder of the adversarial prompt. The reference uses the original one, which equals
    # the erased one for the UNet-only defenses it attacked; "erased" also attacks text-encoder defenses.
    text_encoder: str = field(default="erased", metadata=bounds(choices=("erased", "original")))


@dataclass
class P4DNConfig(P4DConfig):
    """P4D-N: N free learned tokens replace the prompt."""

    prompt_length: int = field(default=16, metadata=bounds(min=1, max=MAX_LENGTH - 2))


@dataclass
class P4DKConfig(P4DConfig):
    """P4D-K: one learned token before every K prompt tokens."""

    every_k: int = field(default=3, metadata=bounds(min=1))


@dataclass
class _Layout:
    """Token layout of the text encoder's input: fixed ids and the positions of the learned tokens."""

    fixed_ids: list[int]
    learned_positions: list[int]
    body_slice: slice


class _P4D(Attack):
    """Shared P4D loop; subclasses lay out the soft prompt and encode the target prompt."""

    version = "1"

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._clip = None

    def attack(self, context: AttackContext) -> AdversarialPrompt:
        config = self.config
        erased, original, record = context.model, context.original_model(), context.record
        encoder_model = erased if config.text_encoder == "erased" else original
        table = encoder_model.token_embedding.weight.detach()
        info: dict = {"variant": self.name}

        target_pixels, target_latents = self._target(context, original, info)
        target_states = self._target_states(original, record.prompt)
        layout = self._layout(encoder_model, record.prompt, info)
        selection = self._selection(info)

        init_ids = torch.randint(0, table.shape[0], (len(layout.learned_positions),), generator=context.generator)
        soft = table[init_ids.to(table.device)].clone().float().requires_grad_(True)
        optimizer = torch.optim.AdamW([soft], lr=config.lr, weight_decay=config.weight_decay)
        scheduler = erased.noise_scheduler()
        # The table is frozen, so its unit rows are computed once instead of every iteration.
        keys = unit_rows(table)

        best = {"key": None, "ids": None, "text": "", "success": None, "iteration": -1}
        evaluations = []
        progress = tqdm(range(config.iterations), desc=self.name, disable=not context.show_progress, leave=False)
        for iteration in progress:
            learned_ids, hard = straight_through_projection(soft, table, keys)
            text_states = self._encode(encoder_model, self._sequence(layout, hard, table))

            noise = draw_noise(tuple(target_latents.shape), context.generator, erased.device)
            timestep = torch.tensor([draw_timestep(context.generator, scheduler.config.num_train_timesteps)],
                                    device=erased.device)
            noisy = noisy_latents(scheduler, target_latents, noise, timestep)
            with torch.no_grad():
                target_noise = original.predict_noise(noisy.to(original.dtype), timestep, target_states).float()
            prediction = erased.predict_noise(noisy.to(erased.dtype), timestep, text_states).float()
            loss = F.mse_loss(prediction, target_noise)

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            if iteration % config.eval_every == 0:
                body = self._body_ids(layout, learned_ids)
                text = erased.tokenizer.decode(body)
                key, success = self._score(context, selection, text, target_pixels)
                evaluations.append({"iteration": iteration, "loss": round(float(loss.detach()), 6),
                                    "score": round(key[-1], 6), "success": success})
                if best["key"] is None or key > best["key"]:
                    best.update(key=key, ids=body, text=text, success=success, iteration=iteration)
                if config.stop_on_success and success:
                    info["stopped"] = f"success at iteration {iteration}"
                    break
        progress.close()

        info.update(selection=selection, best_iteration=best["iteration"], evaluations=evaluations,
                    optimised_padding_id=PAD_TOKEN_ID)
        info.setdefault("stopped", "iterations used up")
        return AdversarialPrompt(text=best["text"], token_ids=padded_ids(best["ids"]),
                                 succeeded_during_attack=best["success"], steps=iteration + 1, info=info)

    # -- target ---------------------------------------------------------------------------

    def _target(self, context: AttackContext, original, info: dict) -> tuple[np.ndarray, torch.Tensor]:
        """Render the candidates with the original model and keep the one the evaluator scores highest."""
        config, record = self.config, context.record
        sampler = config.target_sampler or original.default_sampler
        seeds = [record.seed + offset for offset in range(config.target_candidates)]
        candidates = render_images(original, record.prompt, seeds, record.guidance, sampler, config.target_steps)
        scores = [verdict.score for verdict in context.evaluator.score(candidates, [record.extra] * len(candidates))]
        chosen = int(np.argmax(scores))
        info["target_image"] = {"sampler": sampler, "steps": config.target_steps, "guidance": record.guidance,
                                "seeds": seeds, "scores": [round(s, 6) for s in scores], "chosen_seed": seeds[chosen],
                                "vae_range": config.target_vae_range}
        latents = encode_pixels(original, [candidates[chosen]], signed_range=config.target_vae_range == "signed")
        return candidates[chosen], latents

    def _target_states(self, original, prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return original.encode_prompts([prompt])

    # -- soft prompt ----------------------------------------------------------------------

    def _layout(self, model, prompt: str, info: dict) -> _Layout:
        raise NotImplementedError

    def _sequence(self, layout: _Layout, learned: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Word embeddings of the whole sequence, with the learned rows in place (1 x length x width)."""
        fixed = table[torch.tensor(layout.fixed_ids, device=table.device)].to(learned.dtype)
        positions = torch.tensor(layout.learned_positions, device=table.device)
        sequence = fixed.index_copy(0, positions, learned)
        return sequence.unsqueeze(0)

    def _encode(self, model, word_embeddings: torch.Tensor) -> torch.Tensor:
        return model.encode_word_embeddings(word_embeddings.to(model.dtype))

    def _body_ids(self, layout: _Layout, learned_ids: torch.Tensor) -> list[int]:
        ids = list(layout.fixed_ids)
        for position, token in zip(layout.learned_positions, learned_ids.tolist()):
            ids[position] = token
        return ids[layout.body_slice]

    # -- selection ------------------------------------------------------------------------

    def _selection(self, info: dict) -> dict:
        """Decide how the best prompt is chosen, loading the CLIP model when it is used."""
        config = self.config
        if config.selection == "evaluator":
            return {"criterion": "evaluator", "reason": "attack.selection is evaluator"}
        weights = find_clip_weights(config.clip_weights)
        if weights is None:
            if config.selection == "clip":
                raise FileNotFoundError(
                    f"attack.selection is clip, but attack.clip_weights is empty and {CLIP_HUB_MODEL_ID}/"
                    f"{CLIP_HUB_FILES[0]} is not in the local Hugging Face cache. Copy that file into the cache "
                    "(`hf download` on a networked machine), set attack.clip_weights, or set attack.selection=evaluator"
                )
            return {"criterion": "evaluator",
                    "reason": f"no local weights for open_clip {config.clip_model} ({CLIP_HUB_MODEL_ID})"}
        if self._clip is None:
            self._clip = _ClipImageSimilarity(config.clip_model, weights)
        return {"criterion": "clip", "model": config.clip_model, "weights": str(weights)}

    def _score(self, context: AttackContext, selection: dict, text: str, target: np.ndarray) -> tuple[tuple, bool | None]:
        """Return a sort key (higher is better) and the judged success, if the image was judged."""
        config = self.config
        if selection["criterion"] == "clip":
            image = self._eval_image(context, text)
            similarity = self._clip.similarity(target, image)
            success = context.judge(prompt=text).success if config.stop_on_success else None
            return (similarity,), success
        verdict = context.judge(prompt=text)
        return (float(verdict.success), float(verdict.score)), bool(verdict.success)

    def _eval_image(self, context: AttackContext, text: str) -> np.ndarray:
        config, model, record = self.config, context.model, context.record
        sampler = config.eval_sampler or model.default_sampler
        return render_images(model, text, [record.seed], record.guidance, sampler, config.eval_steps)[0]


class P4DN(_P4D):
    """P4D-N (Chin et al., ICML 2024): 16 free hard tokens replace the prompt."""

    name = "p4d-n"
    Config = P4DNConfig

    def _layout(self, model, prompt: str, info: dict) -> _Layout:
        length = self.config.prompt_length
        fixed = [BOS_TOKEN_ID] + [PAD_TOKEN_ID] * length + [EOS_TOKEN_ID]
        fixed += [PAD_TOKEN_ID] * (MAX_LENGTH - len(fixed))
        info["learned_tokens"] = length
        return _Layout(fixed, list(range(1, 1 + length)), slice(1, 1 + length))


class P4DK(_P4D):
    """P4D-K (Chin et al., ICML 2024): one hard token learned before every 3 prompt tokens."""

    name = "p4d-k"
    Config = P4DKConfig

    def _layout(self, model, prompt: str, info: dict) -> _Layout:
        every = self.config.every_k
        tokens = model.tokenizer(prompt, truncation=False).input_ids[1:-1]
        learned = len(tokens) // every + 1
        body_length = len(tokens) + learned

        body, source = [], iter(tokens)
        for position in range(body_length):
            body.append(PAD_TOKEN_ID if position % (every + 1) == 0 else next(source))

        # The sequence is [start, body, token-0 padding], with at least one padding position and
        # 77 positions in all when the body fits.
        padding = max(MAX_LENGTH - 1 - body_length, 1)
        fixed = [BOS_TOKEN_ID] + body + [PAD_TOKEN_ID] * padding
        positions = [1 + position for position in range(0, body_length, every + 1)]
        info["learned_tokens"] = learned
        if len(fixed) > MAX_LENGTH:
            info["encoded_in_windows"] = len(fixed)
            info["evaluated_prompt_truncated"] = True
        return _Layout(fixed, positions, slice(1, 1 + body_length))

    def _encode(self, model, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Encode 77-position windows separately and join them, as the reference does for long prompts."""
        windows = word_embeddings.to(model.dtype).split(MAX_LENGTH, dim=1)
        return torch.cat([model.encode_word_embeddings(window) for window in windows], dim=1)

    def _target_states(self, original, prompt: str) -> torch.Tensor:
        """Encode the prompt padded to max(77, words + 20) positions in 77-position windows."""
        length = max(MAX_LENGTH, len(prompt.split(" ")) + 20)
        ids = original.tokenizer([prompt], padding="max_length", max_length=length, truncation=True,
                                 return_tensors="pt").input_ids
        with torch.no_grad():
            return torch.cat([original.encode_ids(window) for window in ids.split(MAX_LENGTH, dim=1)], dim=1)


# ----------------------------------------------------------------------------------------
# CLIP image similarity


def find_clip_weights(configured: str) -> Path | None:
    """Return the configured CLIP weights file, else the cached laion ViT-H-14 file, else None."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"attack.clip_weights {path} does not exist; give an open_clip checkpoint file")
        return path

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for filename in CLIP_HUB_FILES:
        try:
            return Path(hf_hub_download(CLIP_HUB_MODEL_ID, filename, local_files_only=True))
        except (LocalEntryNotFoundError, OSError):
            continue
    return None


class _ClipImageSimilarity:
    """Cosine similarity of open_clip image embeddings, as P4D's ``measure_similarity``."""

    def __init__(self, model_name: str, weights: Path) -> None:
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(weights), weights_only=True)
        self.model.eval()

    def similarity(self, first: np.ndarray, second: np.ndarray) -> float:
        from PIL import Image

        batch = torch.stack([self.preprocess(Image.fromarray(image)) for image in (first, second)])
        with torch.no_grad():
            features = F.normalize(self.model.encode_image(batch).float(), dim=-1)
        return float(features[0] @ features[1])
