"""CCE (Circumventing Concept Erasure): textual inversion of one new token on the erased model.

Reference: Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image Generative
Models" (ICLR 2024), code github.com/NYU-DICE-Lab/circumventing-concept-erasure
(``<method>/concept_inversion.py``, ``train.sh``, ``generate_images.py``), which runs the
diffusers textual-inversion loop on the erased pipeline.

1. The original model renders 25 images of the concept (seeds 0-24 by default, 50 sampler
   steps, guidance 7.5).
2. One new word embedding v, initialised from a word ("art" for styles), is trained on the
   erased model, all of whose weights stay frozen:
   v* = argmin E ||eps_erased(z_t, t, CLIP(template(v))) - n||^2 over images, t ~ U{0..999},
   n ~ N(0, I) and a template drawn per sample ("a photo of a {}" family for objects,
   "a painting in the style of {}" family for styles). AdamW, lr 0.08 (5e-3 scaled by batch 4 x
   gradient accumulation 4), weight decay 1e-2, 5,000 updates, random horizontal flips.
3. Each attack prompt is the concept's prompt with the concept phrase replaced by v.

The inversion is done once per (erased model, concept, config) and shared by every prompt. Its
randomness comes from ``attack.seed``, not from a prompt, so every prompt gets the same
embedding whatever the prompt order, batching or resuming. The embedding is cached as
safetensors under the suite's cache folder, and ``info["embedding"]`` names the file.

v has no text form. ``token_ids`` hold the initialiser word's id at v's position, and ``text``
is the decode of those ids; the post-attack image comes from ``text_states``, which contain v.
``info["display_text"]`` shows the prompt with the placeholder name in v's position.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from attacks._common import (
    CONTENT_POSITIONS, decode_ids, draw_noise, encode_pixels, noisy_latents, padded_ids, render_images,
)
from benchmark.config import bounds, config_to_dict
from benchmark.generation import SAMPLERS
from benchmark.plugins import AdversarialPrompt, Attack, AttackContext
from benchmark.results import write_json_atomic

logger = logging.getLogger(__name__)

# Training templates of the diffusers textual-inversion example
# (examples/textual_inversion/textual_inversion.py), which CCE's concept_inversion.py copies.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)
PERSON_TEMPLATES = ("a photo portrait of {}", "a DSLR portrait of {}")
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES, "person": PERSON_TEMPLATES}

# Per concept kind: templates, initialiser word and the prompt of the training images.
# "art" is the reference default; "nude" with person templates follows a suggestion in the
# reference's issue tracker for nudity; objects have no reference default.
KIND_DEFAULTS = {
    "object": {"templates": "object", "initializer": "object", "image_prompt": "a photo of a {}"},
    "style": {"templates": "style", "initializer": "art", "image_prompt": "a painting in the style of {}"},
    "nudity": {"templates": "person", "initializer": "nude", "image_prompt": "{}"},
    "other": {"templates": "object", "initializer": "object", "image_prompt": "{}"},
}


@dataclass
class CCEConfig:
    """CCE settings; defaults are the reference's ``train.sh`` (HEAD, September 2023)."""

    # Name of the new token in info["display_text"]. It is display only and never tokenized.
    placeholder: str = "<concept>"
    # A single-token word whose embedding starts v. Empty: by concept kind (style: "art").
    initializer: str = ""
    # "object", "style" or "person" template family. Empty: by concept kind.
    templates: str = field(default="", metadata=bounds(choices=("", "object", "style", "person")))
    # Training images by the original model; "{}" takes the concept phrase. Empty: by kind.
    image_prompt: str = ""
    num_train_images: int = field(default=25, metadata=bounds(min=1))
    image_seed: int = 0
    # Empty: the model's default sampler (the reference renders with the pipeline's PNDM).
    image_sampler: str = field(default="", metadata=bounds(choices=("",) + tuple(SAMPLERS)))
    image_steps: int = field(default=50, metadata=bounds(min=1))
    image_guidance: float = 7.5
    train_batch_size: int = field(default=4, metadata=bounds(min=1))
    gradient_accumulation_steps: int = field(default=4, metadata=bounds(min=1))
    max_train_steps: int = field(default=5000, metadata=bounds(min=0))
    # Effective rate: the reference's 5e-3 with --scale_lr times batch 4 x accumulation 4 on one GPU.
    learning_rate: float = field(default=0.08, metadata=bounds(min=0))
    adam_beta1: float = field(default=0.9, metadata=bounds(min=0, max=1))
    adam_beta2: float = field(default=0.999, metadata=bounds(min=0, max=1))
    adam_epsilon: float = field(default=1e-8, metadata=bounds(min=0))
    weight_decay: float = field(default=1e-2, metadata=bounds(min=0))
    flip_probability: float = field(default=0.5, metadata=bounds(min=0, max=1))
    # Seeds the inversion (image order, flips, templates, timesteps, noise).
    seed: int = 0
    # "replace" puts v in place of the concept phrase, or before the prompt when the phrase is
    # missing. "prepend" puts v before the prompt, as CCE's I2P mode. "template" uses attack_template.
    prompt_mode: str = field(default="replace", metadata=bounds(choices=("replace", "prepend", "template")))
    attack_template: str = "a painting in the style of {}"


class CCE(Attack):
    """CCE (Pham et al., ICLR 2024): one token learned by textual inversion on the erased model."""

    name = "cce"
    version = "1"
    Config = CCEConfig

    def __init__(self, config: CCEConfig | None = None) -> None:
        super().__init__(config)
        self._embeddings: dict[str, tuple[torch.Tensor, dict]] = {}

    def attack(self, context: AttackContext) -> AdversarialPrompt:
        model = context.model
        embedding, training = self.learned_embedding(context)
        stand_in = self._initializer_id(context)

        prefix, suffix, mode = self._prompt_parts(context)
        ids, position = ids_with_slot(model, prefix, suffix, stand_in)
        with torch.no_grad():
            text_states = model.encode_word_embeddings(self._word_embeddings(model, [ids], [position], embedding))

        placeholder = self.config.placeholder
        info = {
            "prompt_mode": mode,
            "placeholder": placeholder,
            "placeholder_position": position,
            "stand_in_token_id": stand_in,
            "stand_in_word": self._initializer(context),
            "display_text": f"{prefix}{placeholder}{suffix}".strip(),
            "text_form": "token_ids hold the stand-in word's id at placeholder_position; the learned "
                         "embedding replaces its row, and text_states carry it",
            "embedding": training,
        }
        return AdversarialPrompt(text=decode_ids(model.tokenizer, ids), token_ids=ids, text_states=text_states.cpu(),
                                 succeeded_during_attack=None, steps=training["trained_steps"], info=info)

    # -- prompts --------------------------------------------------------------------------

    def _kind_default(self, context: AttackContext, key: str) -> str:
        return KIND_DEFAULTS.get(context.concept.kind, KIND_DEFAULTS["other"])[key]

    def _initializer(self, context: AttackContext) -> str:
        return self.config.initializer or self._kind_default(context, "initializer")

    def _initializer_id(self, context: AttackContext) -> int:
        word = self._initializer(context)
        ids = context.model.tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"attack.initializer {word!r} is {len(ids)} tokens; textual inversion starts from "
                             "one token's embedding, so choose a word the CLIP tokenizer keeps whole, e.g. 'art'")
        return ids[0]

    def _prompt_parts(self, context: AttackContext) -> tuple[str, str, str]:
        """Split the attack prompt around v's position; returns (prefix, suffix, mode used)."""
        config, prompt, phrase = self.config, context.record.prompt, context.concept.erase_phrase
        if config.prompt_mode == "template":
            prefix, _, suffix = config.attack_template.partition("{}")
            return prefix, suffix, "template"
        if config.prompt_mode == "replace":
            match = re.search(re.escape(phrase), prompt, flags=re.IGNORECASE)
            if match:
                return prompt[: match.start()], prompt[match.end() :], "replace"
            return "", " " + prompt, "prepend (the prompt does not contain the concept phrase)"
        return "", " " + prompt, "prepend"

    def _word_embeddings(self, model, ids: list[list[int]], positions: list[int], embedding: torch.Tensor):
        table = model.token_embedding.weight
        rows = table[torch.tensor(ids, device=table.device)]
        mask = torch.zeros(rows.shape[:2], dtype=torch.bool, device=table.device)
        mask[torch.arange(len(ids)), torch.tensor(positions)] = True
        return torch.where(mask.unsqueeze(-1), embedding.to(rows.dtype), rows)

    # -- inversion ------------------------------------------------------------------------

    def learned_embedding(self, context: AttackContext) -> tuple[torch.Tensor, dict]:
        """Return v for this erased model and concept: from memory, from the cache, or trained now.

        The cache entry is read and written under a file lock, so processes that share the cache
        (sweep shards, Slurm array tasks) train each embedding once: the others wait and load it.
        """
        from benchmark.paths import cache_dir, exclusive_lock

        key = self._cache_key(context)
        if key in self._embeddings:
            return self._embeddings[key]

        folder = cache_dir() / "cce" / key
        with exclusive_lock(folder.with_name(f"{key}.lock"), f"the CCE embedding {key}"):
            self._embeddings[key] = self._load_or_train(context, key, folder)
        return self._embeddings[key]

    def _load_or_train(self, context: AttackContext, key: str, folder: Path) -> tuple[torch.Tensor, dict]:
        from benchmark.models.checkpoints import load_state_dict, save_state_dict

        path, record = folder / "embedding.safetensors", folder / "training.json"
        # training.json is written last, so a process killed while saving leaves no half entry.
        if record.exists():
            embedding = load_state_dict(path)["embedding"].to(context.model.device)
            training = json.loads(record.read_text())
            training["reused_from_cache"] = True
            logger.info("reusing the CCE embedding %s", path)
            return embedding, training

        embedding, training = self._train(context)
        save_state_dict({"embedding": embedding}, path)
        training.update(key=key, file=str(path), sha256=_file_sha256(path))
        write_json_atomic(record, training)
        training["reused_from_cache"] = False
        return embedding, training

    def _cache_key(self, context: AttackContext) -> str:
        concept = context.concept
        source = {"erased": context.model.weights_sha256(), "concept": [concept.name, concept.erase_phrase, concept.kind],
                  "config": {k: v for k, v in config_to_dict(self.config).items()
                             if k not in ("placeholder", "prompt_mode", "attack_template")},
                  "version": self.version}
        return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:24]

    def _training_latents(self, context: AttackContext) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Render the training images with the original model; return latents, flipped latents and a record."""
        config = self.config
        original = context.original_model()
        prompt = (config.image_prompt or self._kind_default(context, "image_prompt")).format(context.concept.erase_phrase)
        sampler = config.image_sampler or original.default_sampler
        seeds = [config.image_seed + index for index in range(config.num_train_images)]
        pixels = render_images(original, prompt, seeds, config.image_guidance, sampler, config.image_steps)
        latents = encode_pixels(context.model, pixels)
        flipped = encode_pixels(context.model, [np.ascontiguousarray(image[:, ::-1]) for image in pixels])
        record = {"prompt": prompt, "seeds": [seeds[0], seeds[-1]], "sampler": sampler, "steps": config.image_steps,
                  "guidance": config.image_guidance, "count": len(seeds)}
        return latents, flipped, record

    def _train(self, context: AttackContext) -> tuple[torch.Tensor, dict]:
        """Textual inversion of one embedding on the frozen erased model."""
        config, model = self.config, context.model
        generator = torch.Generator().manual_seed(config.seed)
        latents, flipped, images = self._training_latents(context)
        templates = TEMPLATES[config.templates or self._kind_default(context, "templates")]
        stand_in = self._initializer_id(context)
        slots = [ids_with_slot(model, *template.split("{}", 1), stand_in) for template in templates]

        table = model.token_embedding.weight
        embedding = table[stand_in].detach().clone().float().requires_grad_(True)
        optimizer = torch.optim.AdamW([embedding], lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                      eps=config.adam_epsilon, weight_decay=config.weight_decay)
        scheduler = model.noise_scheduler()
        order = _EpochSampler(len(latents), generator)

        loss_value = float("nan")
        progress = tqdm(range(config.max_train_steps), desc="cce inversion", disable=not context.show_progress,
                        leave=False)
        for _ in progress:
            optimizer.zero_grad()
            loss_value = 0.0
            for _ in range(config.gradient_accumulation_steps):
                loss = self._micro_batch_loss(model, scheduler, latents, flipped, slots, embedding, order, generator)
                (loss / config.gradient_accumulation_steps).backward()
                loss_value += float(loss.detach()) / config.gradient_accumulation_steps
            optimizer.step()
        progress.close()

        training = {"trained_steps": config.max_train_steps, "final_loss": round(loss_value, 6),
                    "images": images, "templates": config.templates or self._kind_default(context, "templates"),
                    "initializer": self._initializer(context)}
        return embedding.detach(), training

    def _micro_batch_loss(self, model, scheduler, latents, flipped, slots, embedding, order, generator) -> torch.Tensor:
        count = self.config.train_batch_size
        indices = torch.tensor([order.next() for _ in range(count)])
        flips = torch.rand(count, generator=generator) < self.config.flip_probability
        chosen = torch.randint(0, len(slots), (count,), generator=generator).tolist()

        clean = torch.where(flips.view(-1, 1, 1, 1).to(latents.device), flipped[indices], latents[indices])
        noise = draw_noise(tuple(clean.shape), generator, model.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator)
        noisy = noisy_latents(scheduler, clean, noise, timesteps)

        words = self._word_embeddings(model, [slots[i][0] for i in chosen], [slots[i][1] for i in chosen], embedding)
        text_states = model.encode_word_embeddings(words)
        prediction = model.predict_noise(noisy.to(model.dtype), timesteps.to(model.device), text_states).float()
        return F.mse_loss(prediction, noise)


def ids_with_slot(model, prefix: str, suffix: str, stand_in: int) -> tuple[list[int], int]:
    """Tokenize prefix + slot + suffix; return 77 padded ids and the slot's position.

    CLIP's BPE splits words at whitespace and punctuation, so tokenizing the two parts apart
    gives the ids of the whole text. A suffix that does not fit is cut so that the slot stays.
    """
    before = model.tokenizer(prefix, add_special_tokens=False).input_ids if prefix.strip() else []
    after = model.tokenizer(suffix, add_special_tokens=False).input_ids if suffix.strip() else []
    before = before[: CONTENT_POSITIONS - 1]
    tokens = before + [stand_in] + after
    return padded_ids(tokens), 1 + len(before)


class _EpochSampler:
    """Image indices in a fresh random order each epoch, as a shuffling data loader gives them."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.generator, self.queue = size, generator, []

    def next(self) -> int:
        if not self.queue:
            self.queue = torch.randperm(self.size, generator=self.generator).tolist()
        return self.queue.pop(0)


def _file_sha256(path) -> str:
    from benchmark.prompts import file_sha256

    return file_sha256(path)
