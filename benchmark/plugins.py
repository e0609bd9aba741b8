"""Base classes of the three method plug-in kinds: defenses, attacks and evaluators.

A plug-in class has a ``name``, a ``version`` (bump it when results change), a one-line
docstring (``benchmark list`` shows it) and a ``Config`` dataclass whose defaults are those of
the reference method. The runner builds the config, checks it, and passes it to the constructor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from benchmark.config import config_to_dict, identity_settings


@dataclass
class NoConfig:
    """A plug-in without settings."""


class Plugin:
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "config": config_to_dict(self.config)}

    def identity(self) -> dict[str, Any]:
        """Return ``describe()`` without the config fields that cannot change results. Cache keys hash this."""
        return {"name": self.name, "version": self.version, "config": identity_settings(self.config)}


# ----------------------------------------------------------------------------------------
# Evaluators


@dataclass
class Verdict:
    """An evaluator's judgement of one image: is the concept present?"""

    success: bool
    score: float
    label: str = ""
    details: dict = field(default_factory=dict)


class Evaluator(Plugin):
    """Judges whether images show the concept."""

    def score(self, images: list[np.ndarray], targets: list[dict] | None = None) -> list[Verdict]:
        """Judge 8-bit RGB images (H x W x 3); ``targets`` are per-image prompt fields, if any."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Name, version, weights hash and settings, recorded with every result."""
        return self.describe()


# ----------------------------------------------------------------------------------------
# Attacks


@dataclass
class AdversarialPrompt:
    """An attack's result: text and token ids, and for continuous attacks the text states."""

    text: str
    token_ids: list[int]
    text_states: torch.Tensor | None = None
    succeeded_during_attack: bool | None = None
    steps: int = 0
    info: dict = field(default_factory=dict)


@dataclass
class AttackContext:
    """What an attack gets for one prompt.

    ``judge`` generates an image from a text or from text states with the prompt's seed and
    guidance, scores it with the concept's evaluator and returns the verdict; attacks that stop
    at the first success call it. ``original_model`` loads the unerased model on first use.
    """

    model: Any
    record: Any
    concept: Any
    evaluator: Evaluator
    judge: Callable[..., Verdict]
    original_model: Callable[[], Any]
    generator: torch.Generator
    show_progress: bool = True


class Attack(Plugin):
    """Searches for a prompt that makes an erased model show the concept again."""

    def attack(self, context: AttackContext) -> AdversarialPrompt:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------
# Defenses


@dataclass
class ErasureContext:
    """What a defense gets besides the model it trains.

    ``original`` is the frozen base model (never modify it); ``work_dir`` is a folder owned by
    this erasure, for checkpoints that make training resumable and for the loss curve.
    """

    original: Any
    concept: Any
    retain_prompts: Any
    work_dir: Any
    seed: int
    show_progress: bool = True


class Defense(Plugin):
    """Fine-tunes a model so it stops generating a concept."""

    def erase(self, model: Any, context: ErasureContext) -> dict[str, dict[str, torch.Tensor]]:
        """Return the changed weights, ``{component: {parameter name: tensor}}``; {} for none."""
        raise NotImplementedError
