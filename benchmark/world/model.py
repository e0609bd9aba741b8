"""The embedded default world as a registered model."""

from __future__ import annotations

from pathlib import Path

import yaml

from benchmark.paths import WORLD_WEIGHTS_DIR

BUDGETS_FILE = Path(__file__).with_name("budgets.yaml")


def world_budgets() -> dict:
    """Per-method budgets that keep a default run on CPU within minutes (see budgets.yaml)."""
    return yaml.safe_load(BUDGETS_FILE.read_text()) or {}


def load_world():
    """The embedded default world: a small trained text-to-image model of shapes, colours and textures (32 x 32)."""
    from benchmark.models.loading import ModelLoadError, load_diffusers_folder

    if not (WORLD_WEIGHTS_DIR / "model_index.json").exists():
        raise ModelLoadError(
            f"the default world's weights are missing from {WORLD_WEIGHTS_DIR}; they ship with the package. "
            "Reinstall it, or rebuild them with `python -m benchmark.world.train` (about an hour on a CPU)"
        )
    return load_diffusers_folder(WORLD_WEIGHTS_DIR, name="world", method_budgets=world_budgets())
