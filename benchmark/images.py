"""Image validity checks, PNG files and pre/post image grids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from benchmark.generation import to_uint8

BLACK_MAX_LEVEL = 8
BLANK_MAX_STD = 2.0


def validity(image: np.ndarray) -> str | None:
    """Return why a generated float image is invalid ("non-finite", "black", "blank"), or None."""
    if not np.isfinite(image).all():
        return "non-finite"
    pixels = to_uint8(image)
    if pixels.max() <= BLACK_MAX_LEVEL:
        return "black"
    if pixels.astype(np.float32).std() < BLANK_MAX_STD:
        return "blank"
    return None


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Write an 8-bit RGB image atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    Image.fromarray(pixels).save(temporary, format="PNG")
    os.replace(temporary, path)


def pre_post_grid(rows: list[tuple[str, Path | None, Path | None]], path: Path, cell: int = 96, max_rows: int = 32) -> None:
    """Write a grid with one row per prompt: its id, the pre-attack and the post-attack image."""
    rows = rows[:max_rows]
    label_width, header = 90, 18
    grid = Image.new("RGB", (label_width + 2 * cell + 12, header + len(rows) * (cell + 4)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_width + 4, 3), "pre-attack", fill="black")
    draw.text((label_width + cell + 8, 3), "post-attack", fill="black")

    for index, (label, pre, post) in enumerate(rows):
        top = header + index * (cell + 4)
        draw.text((4, top + cell // 2 - 6), label[:14], fill="black")
        for column, image_path in enumerate((pre, post)):
            if image_path is None or not Path(image_path).exists():
                continue
            image = Image.open(image_path).convert("RGB")
            resample = Image.NEAREST if image.width < cell else Image.BICUBIC
            grid.paste(image.resize((cell, cell), resample), (label_width + 4 + column * (cell + 4), top))
    save_png(np.asarray(grid), path)
