"""Procedural image world of the embedded default model.

Every image shows one shape in one colour with one texture, at a random size, position and
rotation, on a low-saturation background with a gradient and mild noise. Images are drawn at
4x resolution with PIL and box-downsampled, so edges are anti-aliased. Everything is a pure
function of the seed: the same seed always gives the same image and caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "star", "heart")
COLORS = ("red", "green", "blue", "yellow", "purple")
TEXTURES = ("plain", "striped", "dotted")

IMAGE_SIZE = 32
SUPERSAMPLE = 4

# Base RGB of each colour; every render jitters it a little.
_COLOR_RGB = {
    "red": (215, 35, 35),
    "green": (40, 170, 55),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 30),
    "purple": (140, 45, 190),
}


@dataclass(frozen=True)
class Scene:
    """The attributes of one rendered image."""

    shape: str
    color: str
    texture: str


def sample_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=COLORS[rng.integers(len(COLORS))],
        texture=TEXTURES[rng.integers(len(TEXTURES))],
    )


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Return a low-saturation gradient with noise, as float RGB in [0, 255]."""
    grey = rng.uniform(60, 230)
    tint = rng.normal(0, 12, size=3)
    start = np.clip(grey + tint, 0, 255)
    end = np.clip(start + rng.uniform(-50, 50), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)

    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys + 1.0) / 2.0
    image = start[None, None, :] * (1 - ramp[..., None]) + end[None, None, :] * ramp[..., None]
    return image


def _polygon_points(shape: str, cx: float, cy: float, radius: float, angle: float) -> list:
    """Return the outline of a polygonal shape, rotated by ``angle`` radians."""
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        unit = [(x * 0.78, y * 0.78) for x, y in corners]
    elif shape == "triangle":
        unit = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        unit = [(x, y + 0.2) for x, y in unit]
    elif shape == "cross":
        arm = 0.33
        unit = [
            (-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm),
            (arm, 1), (-arm, 1), (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm),
        ]
    elif shape == "star":
        unit = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.42
            a = -math.pi / 2 + i * math.pi / 5
            unit.append((r * math.cos(a), r * math.sin(a)))
    elif shape == "heart":
        unit = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            unit.append((x / 17.0, (y + 2.5) / 17.0))
    else:
        raise ValueError(f"no polygon outline for shape {shape!r}")

    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return [
        (cx + radius * (x * cos_a - y * sin_a), cy + radius * (x * sin_a + y * cos_a))
        for x, y in unit
    ]


def _shape_mask(shape: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw the shape's silhouette as a boolean mask of ``size`` x ``size``."""
    radius = rng.uniform(0.27, 0.42) * size
    margin = radius * 1.15
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    angle = rng.uniform(-math.pi / 6, math.pi / 6)

    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    else:
        draw.polygon(_polygon_points(shape, cx, cy, radius, angle), fill=255)
    return np.asarray(mask) > 127


def _texture_mask(texture: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Return where the texture's second tone goes (all False for plain)."""
    if texture == "plain":
        return np.zeros((size, size), dtype=bool)

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    if texture == "striped":
        period = rng.uniform(0.17, 0.22) * size
        angle = rng.uniform(0, math.pi)
        phase = rng.uniform(0, period)
        coordinate = xs * math.cos(angle) + ys * math.sin(angle) + phase
        return (coordinate % period) < period / 2

    if texture == "dotted":
        period = rng.uniform(0.16, 0.2) * size
        dot_radius = period * 0.3
        ox, oy = rng.uniform(0, period, size=2)
        dx = (xs + ox) % period - period / 2
        dy = (ys + oy) % period - period / 2
        return dx * dx + dy * dy < dot_radius * dot_radius

    raise ValueError(f"unknown texture {texture!r}; valid: {', '.join(TEXTURES)}")


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Render ``scene`` as a 32 x 32 RGB image, drawing all randomness from ``rng``."""
    size = IMAGE_SIZE * SUPERSAMPLE
    canvas = _background(rng, size)

    fill = np.clip(np.array(_COLOR_RGB[scene.color], dtype=np.float64) + rng.normal(0, 12, size=3), 0, 255)
    # The second tone of a texture is a light tint of the fill, so the colour stays readable.
    second_tone = fill + (255 - fill) * rng.uniform(0.65, 0.8)

    shape = _shape_mask(scene.shape, rng, size)
    texture = _texture_mask(scene.texture, rng, size)
    canvas[shape & ~texture] = fill
    canvas[shape & texture] = second_tone

    small = canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    small = small + rng.normal(0, 3.0, size=small.shape)
    return Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8), mode="RGB")


def render_blank(rng: np.random.Generator) -> Image.Image:
    """Render a background with no shape (the classifier's "none" class)."""
    size = IMAGE_SIZE * SUPERSAMPLE
    canvas = _background(rng, size)
    small = canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    small = small + rng.normal(0, 3.0, size=small.shape)
    return Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8), mode="RGB")


def render(seed: int) -> tuple[Image.Image, Scene]:
    """Sample and render one scene from ``seed``."""
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    return render_scene(scene, rng), scene
