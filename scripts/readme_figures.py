"""Draw the README's pictures of the default world.

    python scripts/readme_figures.py --output docs/images
    python scripts/readme_figures.py --output docs/images --run RUN_DIR [--rows 8]

The first form writes ``world_dataset.png`` (rendered training images with their attributes)
and ``world_samples.png`` (the base model's images for one prompt per row). The second writes
only ``run_grid.png``: the run's first ``--rows`` prompts with their pre- and post-attack images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CELL = 64
SAMPLE_PROMPTS = (
    "a red circle",
    "a blue square, striped",
    "a green triangle, dotted",
    "a yellow star",
    "a purple heart with a striped pattern",
    "a photo of a red cross, dotted",
)


def _grid(rows: list[list[np.ndarray]], labels: list[str], label_width: int = 230) -> Image.Image:
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (label_width + columns * (CELL + 2), len(rows) * (CELL + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels)):
        draw.text((4, r * (CELL + 2) + CELL // 2 - 6), label, fill="black")
        for c, image in enumerate(row):
            tile = Image.fromarray(image).resize((CELL, CELL), Image.NEAREST)
            grid.paste(tile, (label_width + c * (CELL + 2), r * (CELL + 2)))
    return grid


def dataset_figure(path: Path) -> None:
    from benchmark.world.render import COLORS, SHAPES, TEXTURES, Scene, render_scene

    rows, labels = [], []
    for index, shape in enumerate(SHAPES):
        row = []
        for column in range(8):
            rng = np.random.default_rng(1000 * index + column)
            scene = Scene(shape, COLORS[column % len(COLORS)], TEXTURES[column % len(TEXTURES)])
            row.append(np.asarray(render_scene(scene, rng)))
        rows.append(row)
        labels.append(shape)
    _grid(rows, labels, label_width=70).save(path)


def samples_figure(path: Path, samples: int = 8) -> None:
    import torch

    from benchmark.generation import Sampling, generate, to_uint8
    from benchmark.models.loading import load_model

    torch.manual_seed(0)
    model = load_model("world")
    sampling = Sampling(model.default_sampler, model.default_steps, model.resolution)
    rows = []
    for prompt in SAMPLE_PROMPTS:
        images = generate(model, list(range(samples)), [5.0] * samples, sampling, prompts=[prompt] * samples,
                          batch_size=samples, batch_invariant=False)
        rows.append([to_uint8(image) for image in images])
    _grid(rows, [f'"{p}"' for p in SAMPLE_PROMPTS]).save(path)


def run_figure(run_dir: Path, path: Path, rows: int) -> None:
    from benchmark.images import pre_post_grid

    lines = (run_dir / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[:rows]]
    pre_post_grid(records, run_dir, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("docs/images"))
    parser.add_argument("--run", type=Path, help="a run folder to draw the pre/post-attack grid of")
    parser.add_argument("--rows", type=int, default=8, help="prompts in the run grid (default: 8)")
    args = parser.parse_args(argv)

    args.output.mkdir(parents=True, exist_ok=True)
    if args.run:
        run_figure(args.run, args.output / "run_grid.png", args.rows)
        return
    dataset_figure(args.output / "world_dataset.png")
    samples_figure(args.output / "world_samples.png")


if __name__ == "__main__":
    main()
