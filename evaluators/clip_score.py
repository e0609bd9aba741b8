"""CLIP score: cosine similarity between an image and its caption, OpenAI CLIP ViT-B/32.

AdvUnlearn's utility table (``train-scripts/img_retain_eval.py``) runs transformers'
``openai/clip-vit-base-patch32`` on each COCO-10k image and its caption and reports the mean of
``logits_per_image / 100``, i.e. the mean cosine similarity, unclamped (about 0.31 for models
close to SD v1.4). ``clip_score`` here is that value. ``clip_score_100`` is the other common
convention, the mean of ``100 * max(cosine, 0)`` (torchmetrics' ``CLIPScore``), for comparison
with papers that use it.

The model is open_clip's ``ViT-B-32`` with the OpenAI weights read from a local file:
``open_clip_model.safetensors`` of the Hugging Face repository
``timm/vit_base_patch32_clip_224.openai`` (the file open_clip itself fetches for
``pretrained="openai"``). OpenAI checkpoints were trained with QuickGELU, so ``quick_gelu`` is
on by default. Images are resized (short side to 224, bicubic), centre-cropped to 224 and
normalised with OpenAI's mean and std; captions are truncated to CLIP's 77 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmark.config import bounds
from benchmark.plugins import Evaluator, Verdict

HUB_MODEL_ID = "timm/vit_base_patch32_clip_224.openai"
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass
class ClipScoreConfig:
    """The CLIP model and weights file, and the caption and threshold of per-image verdicts."""

    # An open_clip model name.
    model: str = "ViT-B-32"
    # A local open_clip checkpoint (.safetensors, or a weights-only .bin or .pt). Empty: the
    # open_clip_model.safetensors of timm/vit_base_patch32_clip_224.openai in the Hugging Face cache.
    weights: str = ""
    quick_gelu: bool = True
    # Caption of per-image verdicts. Empty: each prompt's "prompt" or "caption" field.
    text: str = ""
    # Per-image verdicts succeed when the cosine similarity is above this. The reference
    # reports only the mean, so this value has no reference default.
    threshold: float = field(default=0.0, metadata=bounds(min=-1.0, max=1.0))
    batch_size: int = field(default=32, metadata=bounds(min=1))
    # Empty: CUDA when available, else CPU.
    device: str = ""


class ClipScoreEvaluator(Evaluator):
    """CLIP ViT-B/32 image-caption cosine similarity (utility metric)."""

    name = "clip-score"
    version = "1"
    Config = ClipScoreConfig

    def __init__(self, config: ClipScoreConfig | None = None) -> None:
        super().__init__(config)
        from benchmark.models.checkpoints import check_checkpoint_file
        from benchmark.prompts import file_sha256

        from evaluators.style_classifier import resolve_device

        self.weights_path = _resolve_weights_path(self.config.weights)
        check_checkpoint_file(self.weights_path)
        self.weights_sha256 = file_sha256(self.weights_path)
        self.device = resolve_device(self.config.device)

        import open_clip

        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                self.config.model, pretrained=str(self.weights_path), force_quick_gelu=self.config.quick_gelu,
                weights_only=True, device=self.device,
            )
        except RuntimeError as error:
            raise RuntimeError(
                f"evaluator.weights {self.weights_path} does not fit open_clip model {self.config.model!r} "
                f"(or is not a weights-only checkpoint; OpenAI's TorchScript .pt files are not read): {error}"
            ) from error
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.config.model)

    def similarities(self, images: list[np.ndarray], captions: list[str]) -> np.ndarray:
        """Return the cosine similarity of each image with its caption."""
        from PIL import Image

        from benchmark.scoring import as_rgb_uint8

        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions; give one caption per image")

        values = []
        for start in range(0, len(images), self.config.batch_size):
            end = start + self.config.batch_size
            pixels = torch.stack([self.preprocess(Image.fromarray(as_rgb_uint8(image, start + offset)))
                                  for offset, image in enumerate(images[start:end])]).to(self.device)
            tokens = self.tokenizer(list(captions[start:end])).to(self.device)
            with torch.no_grad():
                image_features = self.model.encode_image(pixels, normalize=True).float()
                text_features = self.model.encode_text(tokens, normalize=True).float()
            values.append((image_features * text_features).sum(-1).cpu().numpy())
        return np.concatenate(values) if values else np.zeros(0, dtype=np.float32)

    def compute(self, images: list[np.ndarray], captions: list[str]) -> dict[str, Any]:
        """Return the CLIP score of images against their captions, the image count and a status."""
        result: dict[str, Any] = {"clip_score": None, "clip_score_std": None, "clip_score_100": None,
                                  "n_images": len(images), "model": self.config.model,
                                  "weights_sha256": self.weights_sha256}
        if not images:
            result.update(status="unavailable", reason="no images to score")
            return result

        cosines = self.similarities(images, captions).astype(np.float64)
        result.update(
            status="measured",
            reason="",
            clip_score=float(cosines.mean()),
            clip_score_std=float(cosines.std()),
            clip_score_100=float((100 * np.clip(cosines, 0, None)).mean()),
        )
        return result

    def score(self, images: list[np.ndarray], targets: list[dict] | None = None) -> list[Verdict]:
        captions = [self._caption(index, targets) for index in range(len(images))]
        cosines = self.similarities(images, captions)
        return [Verdict(success=bool(value > self.config.threshold), score=float(value), label="",
                        details={"caption": caption})
                for value, caption in zip(cosines, captions)]

    def _caption(self, index: int, targets: list[dict] | None) -> str:
        if self.config.text:
            return self.config.text
        target = targets[index] if targets else {}
        caption = target.get("prompt") or target.get("caption") or ""
        if not caption:
            raise ValueError(f"no caption for image {index}: set evaluator.text, e.g. "
                             "--set evaluator.text='a photo of a church'")
        return caption

    def info(self) -> dict:
        info = self.describe()
        info.update(weights=str(self.weights_path), weights_sha256=self.weights_sha256, device=str(self.device))
        return info


def _resolve_weights_path(configured: str) -> Path:
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"evaluator.weights {path} does not exist; it must be an open_clip checkpoint file such as "
                f"{HUB_FILES[0]} from the Hugging Face repository {HUB_MODEL_ID}"
            )
        return path

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for filename in HUB_FILES:
        try:
            return Path(hf_hub_download(HUB_MODEL_ID, filename, local_files_only=True))
        except LocalEntryNotFoundError:
            continue
    raise FileNotFoundError(
        f"evaluator.weights is empty and {HUB_MODEL_ID}/{HUB_FILES[0]} is not in the local Hugging Face cache. "
        f"Download it on a machine with network access (`hf download {HUB_MODEL_ID} {HUB_FILES[0]}`) and copy "
        "the cache, or set evaluator.weights to the file's path"
    )
