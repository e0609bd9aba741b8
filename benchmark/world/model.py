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
    verify_world_files(WORLD_WEIGHTS_DIR)
    return load_diffusers_folder(WORLD_WEIGHTS_DIR, name="world", method_budgets=world_budgets())


def verify_world_files(folder: Path) -> None:
    """Check every weights file against the sha256 that ``world.json`` records for it."""
    import json

    from benchmark.models.loading import ModelLoadError
    from benchmark.prompts import file_sha256

    card = folder / "world.json"
    recorded = json.loads(card.read_text()).get("files_sha256", {}) if card.exists() else {}
    if not recorded:
        raise ModelLoadError(f"{card} records no weight hashes; rebuild the world with `python -m benchmark.world.train`")
    for relative, expected in recorded.items():
        path = folder / relative
        if not path.exists():
            raise ModelLoadError(f"the default world's weights file {path} is missing; reinstall the package")
        actual = file_sha256(path)
        if actual != expected:
            raise ModelLoadError(
                f"the default world's weights file {path} has sha256 {actual}, but world.json records {expected}; "
                "the file was changed or damaged. Reinstall the package, or rebuild with `python -m benchmark.world.train`"
            )


# The runner reads a registered model's budget layer from this attribute without loading weights.
load_world.budgets = world_budgets
