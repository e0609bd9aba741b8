"""Image validity checks, PNG files and pre/post image grids."""

from __future__ import annotations

import os
import textwrap
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


# Frame colours of the grid: concept detected, concept absent, invalid image.
DETECTED, ABSENT, INVALID = (200, 30, 30), (40, 150, 60), (150, 150, 150)
ATTACK_TEXT = (30, 60, 170)


def _frame_colour(side: dict) -> tuple[int, int, int]:
    if not side.get("valid"):
        return INVALID
    return DETECTED if side.get("success") else ABSENT


def _wrap(text: str, width: int, lines: int) -> list[str]:
    """Wrap ``text`` at word boundaries into at most ``lines`` lines; a cut last line ends with '...'."""
    printable = "".join(character if character.isprintable() else "?" for character in text)
    rows = textwrap.wrap(printable, width) or [""]
    if len(rows) > lines:
        rows = rows[:lines]
        rows[-1] = rows[-1][: width - 3] + "..."
    return rows


def pre_post_grid(records: list[dict], folder: Path, path: Path, cell: int = 96, max_rows: int = 32) -> None:
    """Write a grid with one row per prompt record: its prompt and adversarial prompt, then the
    pre-attack and the post-attack image framed by the verdict (red: concept detected, green: absent,
    grey: invalid image)."""
    records = records[:max_rows]
    label_width, header, frame, characters = 250, 30, 3, 38
    side = cell + 2 * frame
    grid = Image.new("RGB", (label_width + 2 * side + 12, header + len(records) * (side + 6)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), "prompt / adversarial prompt", fill="black")
    draw.text((label_width + 4, 3), "pre-attack", fill="black")
    draw.text((label_width + side + 8, 3), "post-attack", fill="black")
    draw.text((4, 16), "frame: red = concept detected, green = absent, grey = invalid", fill=(90, 90, 90))

    for index, record in enumerate(records):
        top = header + index * (side + 6)
        lines = [(line, "black") for line in _wrap(f"{record['prompt_id']}: {record['prompt']}", characters, 4)]
        adversarial = record.get("attack", {}).get("text")
        if adversarial and adversarial != record["prompt"]:
            lines += [(line, ATTACK_TEXT) for line in _wrap(f"attack: {adversarial}", characters, 3)]
        elif adversarial:
            lines.append(("attack: the prompt itself", INVALID))
        for number, (line, colour) in enumerate(lines):
            draw.text((4, top + 2 + 12 * number), line, fill=colour)

        for column, name in enumerate(("pre", "post")):
            left = label_width + 4 + column * (side + 4)
            draw.rectangle((left, top, left + side - 1, top + side - 1), fill=_frame_colour(record[name]))
            image_path = Path(folder) / record[name]["image"]
            if not image_path.exists():
                continue
            image = Image.open(image_path).convert("RGB")
            resample = Image.NEAREST if image.width < cell else Image.BICUBIC
            grid.paste(image.resize((cell, cell), resample), (left + frame, top + frame))
    save_png(np.asarray(grid), path)
