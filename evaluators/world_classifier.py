"""The default world's judge: a CNN that reads the shape, colour and texture of 32 x 32 images."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmark.config import bounds
from benchmark.paths import WORLD_WEIGHTS_DIR
from benchmark.plugins import Evaluator, Verdict

WEIGHTS_FILE = "classifier.safetensors"

logger = logging.getLogger(__name__)


@dataclass
class WorldClassifierConfig:
    """Which attribute to read and which label counts as the concept."""

    attribute: str = field(default="shape", metadata=bounds(choices=("shape", "color", "texture")))
    # Empty: take the target from each prompt's column named after the attribute (retain prompts).
    target: str = ""
    weights: str = ""
    # One image per forward pass keeps every score independent of which images share a batch.
    batch_size: int = field(default=1, metadata=bounds(min=1))


class WorldClassifier(Evaluator):
    """Default-world attribute classifier: success when the predicted label equals the target."""

    name = "world-classifier"
    version = "1"
    Config = WorldClassifierConfig

    def __init__(self, config: WorldClassifierConfig | None = None) -> None:
        super().__init__(config)
        from benchmark.world.classifier import HEADS, AttributeClassifier

        self.labels = HEADS[self.config.attribute]
        if self.config.target and self.config.target not in self.labels:
            raise ValueError(
                f"evaluator.target {self.config.target!r} is not a {self.config.attribute} of the world; "
                f"valid: {', '.join(self.labels)}"
            )
        self.weights_path = Path(self.config.weights) if self.config.weights else WORLD_WEIGHTS_DIR / WEIGHTS_FILE
        self.model = AttributeClassifier().eval()
        self.weights_sha256 = _load_weights(self.model, self.weights_path)

    def logits(self, images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        batches = []
        for start in range(0, len(images), self.config.batch_size):
            chunk = np.stack([_as_32px(image) for image in images[start : start + self.config.batch_size]])
            tensor = torch.from_numpy(chunk).permute(0, 3, 1, 2).float() / 255.0
            with torch.no_grad():
                batches.append(self.model(tensor))
        return {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}

    def score(self, images: list[np.ndarray], targets: list[dict] | None = None) -> list[Verdict]:
        if not images:
            return []
        probabilities = self.logits(images)[self.config.attribute].softmax(-1)
        verdicts = []
        for index, row in enumerate(probabilities):
            target = self.config.target or (targets[index].get(self.config.attribute, "") if targets else "")
            if target not in self.labels:
                raise ValueError(
                    f"no valid {self.config.attribute} target for image {index}: set evaluator.target, "
                    f"or give the prompt a {self.config.attribute!r} column with one of {', '.join(self.labels)}"
                )
            predicted = self.labels[int(row.argmax())]
            verdicts.append(Verdict(
                success=predicted == target,
                score=float(row[self.labels.index(target)]),
                label=predicted,
                details={"target": target, "confidence": float(row.max())},
            ))
        return verdicts

    def info(self) -> dict:
        info = self.describe()
        info.update(weights=str(self.weights_path), weights_sha256=self.weights_sha256, labels=list(self.labels))
        return info


def _as_32px(image: np.ndarray) -> np.ndarray:
    if image.shape[:2] == (32, 32):
        return image[..., :3]
    from PIL import Image

    return np.asarray(Image.fromarray(image[..., :3]).resize((32, 32), Image.BICUBIC))


def _load_weights(model: torch.nn.Module, path: Path) -> str:
    from benchmark.models.checkpoints import load_state_dict
    from benchmark.prompts import file_sha256

    if not path.is_file():
        raise FileNotFoundError(
            f"the world classifier's weights are missing: {path}. They ship with the package in "
            f"{WORLD_WEIGHTS_DIR}; rebuild them with `python -m benchmark.world.train`, or set evaluator.weights"
        )
    logger.info("loading the world classifier from %s", path)
    state = load_state_dict(path)
    model.load_state_dict({key: value.float() if value.is_floating_point() else value for key, value in state.items()})
    return file_sha256(path)
