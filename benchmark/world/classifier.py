"""The world's attribute classifier: a small CNN with one head per attribute.

It reads a 32 x 32 RGB image and predicts the shape (the world's shapes plus "none" for an empty
background), the colour and the texture. It is the judge of the default world, as NudeNet or
the ResNet-50 object classifier are for Stable Diffusion.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmark.world.render import COLORS, SHAPES, TEXTURES

SHAPE_LABELS = SHAPES + ("none",)
HEADS = {"shape": SHAPE_LABELS, "color": COLORS, "texture": TEXTURES}


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class AttributeClassifier(nn.Module):
    """CNN over 32 x 32 images in [0, 1] with logits for shape, colour and texture."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_block(3, 32), _block(32, 64), _block(64, 96), nn.AdaptiveAvgPool2d(1))
        self.heads = nn.ModuleDict({name: nn.Linear(96, len(labels)) for name, labels in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images * 2.0 - 1.0).flatten(1)
        return {name: head(features) for name, head in self.heads.items()}
