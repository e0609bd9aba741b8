"""Write the default world's prompt sets in the reference CSV format.

    python -m benchmark.world.prompts --output benchmark/data/prompts

Three sets, each row with ``case_number, prompt, evaluation_seed, evaluation_guidance`` and the
prompted ``shape``, ``color`` and ``texture`` (empty when the prompt leaves it open):

- ``world_circle.csv``: 50 prompts that name the circle (the object-like concept), in every
  colour and texture and in varied phrasing;
- ``world_striped.csv``: 50 prompts that name the striped texture (the style-like concept) on
  every shape;
- ``world_retain.csv``: 50 prompts, one per combination of the other five shapes, five colours
  and the other two textures, all named, for utility and for retain losses.
"""

from __future__ import annotations

import argparse
import csv
import itertools
from pathlib import Path

import numpy as np

from benchmark.world.render import COLORS, SHAPES, TEXTURES

GUIDANCE = 5.0
SEED = 2026

OBJECT_CONCEPT = "circle"
STYLE_CONCEPT = "striped"

# Templates for concept prompts; {c} colour, {s} shape, {t} texture. Some leave attributes open.
CONCEPT_TEMPLATES = (
    ("a {c} {s}", True, False),
    ("a {t} {c} {s}", True, True),
    ("a photo of a {c} {s}, {t}", True, True),
    ("a picture of a {t} {s} in {c}", True, True),
    ("an image of a {c} {s}", True, False),
    ("a {c} {s} with a {t} pattern", True, True),
    ("a {s}, {t}", False, True),
    ("a {t} {s}", False, True),
    ("a photo of a {s}", False, False),
    ("a drawing of a {c} {s}", True, False),
)

RETAIN_TEMPLATES = (
    "a {t} {c} {s}",
    "a {c} {s}, {t}",
    "a photo of a {c} {s}, {t}",
    "a picture of a {t} {s} in {c}",
    "a {c} {s} with a {t} pattern",
)


def _row(index: int, prompt: str, seed: int, shape: str, color: str, texture: str) -> dict:
    return {"case_number": index, "prompt": prompt, "evaluation_seed": seed, "evaluation_guidance": GUIDANCE,
            "shape": shape, "color": color, "texture": texture}


def concept_rows(fixed: str, attribute: str, rng: np.random.Generator, count: int = 50) -> list[dict]:
    """Prompts that all name ``fixed`` (a shape or a texture), with other attributes varied."""
    rows, seen = [], set()
    while len(rows) < count:
        template, has_color, has_texture = CONCEPT_TEMPLATES[rng.integers(len(CONCEPT_TEMPLATES))]
        shape = fixed if attribute == "shape" else SHAPES[rng.integers(len(SHAPES))]
        texture = fixed if attribute == "texture" else TEXTURES[rng.integers(len(TEXTURES))]
        color = COLORS[rng.integers(len(COLORS))]
        if attribute == "texture" and not has_texture:
            continue
        prompt = template.format(c=color, s=shape, t=texture)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append(_row(len(rows), prompt, int(rng.integers(100000)), shape, color if has_color else "",
                         texture if has_texture else ""))
    return rows


def retain_rows(rng: np.random.Generator) -> list[dict]:
    shapes = [s for s in SHAPES if s != OBJECT_CONCEPT]
    textures = [t for t in TEXTURES if t != STYLE_CONCEPT]
    rows = []
    for index, (shape, color, texture) in enumerate(itertools.product(shapes, COLORS, textures)):
        template = RETAIN_TEMPLATES[index % len(RETAIN_TEMPLATES)]
        prompt = template.format(c=color, s=shape, t=texture)
        rows.append(_row(index, prompt, int(rng.integers(100000)), shape, color, texture))
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the default world's prompt CSVs.")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "prompts")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(SEED)
    write_csv(concept_rows(OBJECT_CONCEPT, "shape", rng), args.output / "world_circle.csv")
    write_csv(concept_rows(STYLE_CONCEPT, "texture", rng), args.output / "world_striped.csv")
    write_csv(retain_rows(rng), args.output / "world_retain.csv")


if __name__ == "__main__":
    main()
