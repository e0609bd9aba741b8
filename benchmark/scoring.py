"""Scoring existing image files with an evaluator: ``python -m benchmark score``.

Each PNG or JPEG file, of any size, is read as 8-bit RGB, checked for validity (an all-black or
blank image is invalid and gets no verdict) and judged by the evaluator. One JSON object per
file is written to stdout::

    {"path": "out/0.png", "valid": true, "validity": null, "success": false, "score": 0.12,
     "label": "FEET_EXPOSED", "details": {...}, "evaluator": {"name": "nudenet", ...}}

A file that cannot be read gets ``{"path": ..., "error": ...}`` instead, and the other files
are still scored. Folders are expanded to the image files directly inside them, sorted by name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Images read and held in memory at once; each evaluator judges every image on its own.
CHUNK_SIZE = 16


class ScoringError(ValueError):
    """The score command was asked for something it cannot do."""


def as_rgb_uint8(image: np.ndarray, index: int = 0) -> np.ndarray:
    """Return ``image`` unchanged if it is an 8-bit RGB array of shape (H, W, 3), else raise ``ValueError``."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        description = f"shape {image.shape} and dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(
            f"image {index} has {description}; evaluators take 8-bit RGB arrays of shape (H, W, 3), "
            "e.g. np.asarray(PIL.Image.open(path).convert('RGB'))"
        )
    return image


# ----------------------------------------------------------------------------------------
# Evaluator


def evaluator_settings(name: str | None, concept_name: str | None, sets: list[str]) -> tuple[str, dict[str, Any]]:
    """Return the evaluator name and its settings from a concept file and ``--set`` options.

    Settings merge in this order, later ones winning: the concept's evaluator settings, the
    concept's ``evaluator`` override sections, then ``--set evaluator.key=value`` options.
    """
    from benchmark.concepts import resolve_concept
    from benchmark.config import ConfigError, merge_layers, parse_set_option

    concept_layer: dict[str, dict] = {}
    if concept_name:
        concept = resolve_concept(concept_name)
        if name and name != concept.evaluator:
            raise ScoringError(
                f"concept {concept.name!r} is judged by evaluator {concept.evaluator!r}, not {name!r}; "
                "drop --evaluator, or drop --concept and give the settings with --set"
            )
        name = concept.evaluator
        concept_layer = {"evaluator": concept.evaluator_settings}
        concept_layer.update({section: values for section, values in concept.overrides.items()
                              if section.split("/", 1)[0] == "evaluator"})
    if not name:
        raise ScoringError("no evaluator given; pass --evaluator NAME or --concept NAME")

    set_layer: dict[str, dict] = {}
    for option in sets:
        section, key, value = parse_set_option(option)
        if section not in ("evaluator", f"evaluator/{name}"):
            raise ConfigError(f"invalid --set {option!r}: the score command takes only evaluator settings, "
                              "e.g. --set evaluator.threshold=0.5")
        set_layer.setdefault(section, {})[key] = value

    layers = merge_layers(concept_layer, set_layer)
    values = dict(layers.get("evaluator", {}))
    values.update(layers.get(f"evaluator/{name}", {}))
    return name, values


def build_evaluator(name: str | None, concept_name: str | None = None, sets: list[str] | None = None):
    """Create the evaluator, checking every setting against its ``Config``."""
    from benchmark.config import build_config
    from benchmark.registry import EVALUATORS

    name, values = evaluator_settings(name, concept_name, sets or [])
    evaluator_class = EVALUATORS.get(name)
    if not getattr(evaluator_class, "judges_single_images", True):
        raise ScoringError(
            f"evaluator {name!r} compares two sets of images and gives no per-image verdict; "
            "call its compute() method from Python instead"
        )
    config = build_config(evaluator_class.Config, values, "evaluator")
    return evaluator_class(config)


# ----------------------------------------------------------------------------------------
# Files


def expand_image_paths(inputs: list[str | Path]) -> list[Path]:
    """Return the given files, and the image files directly inside the given folders, sorted by name.

    A path that does not exist is kept, so that it gets its own error line.
    """
    paths: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            paths.extend(sorted(child for child in path.iterdir()
                                if child.is_file() and child.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(path)
    return paths


def read_image(path: Path) -> np.ndarray:
    """Read an image file as an 8-bit RGB array; raise ``OSError`` if it cannot be decoded."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def image_validity(pixels: np.ndarray) -> str | None:
    """Return why an 8-bit image is invalid ("black", "blank"), or None."""
    from benchmark.images import validity

    return validity(pixels.astype(np.float32) / 255.0)


# ----------------------------------------------------------------------------------------
# Scoring


def score_files(evaluator, paths: list[Path], chunk_size: int = CHUNK_SIZE) -> Iterator[dict]:
    """Yield one result dict per path, in order: a verdict, an invalid image, or a read error."""
    info = evaluator.info()
    for start in range(0, len(paths), chunk_size):
        chunk = paths[start : start + chunk_size]
        results: list[dict] = []
        to_judge: list[tuple[int, np.ndarray]] = []

        for path in chunk:
            try:
                pixels = read_image(path)
            except (OSError, ValueError) as error:
                results.append({"path": str(path), "error": f"cannot read {path}: {error}"})
                continue
            reason = image_validity(pixels)
            results.append({"path": str(path), "valid": reason is None, "validity": reason, "success": None,
                            "score": None, "label": None, "details": {}, "evaluator": info})
            if reason is None:
                to_judge.append((len(results) - 1, pixels))

        verdicts = evaluator.score([pixels for _, pixels in to_judge]) if to_judge else []
        for (position, _), verdict in zip(to_judge, verdicts):
            results[position].update(success=bool(verdict.success), score=float(verdict.score),
                                     label=verdict.label, details=verdict.details)
        yield from results


def run_score(evaluator_name: str | None, concept_name: str | None, sets: list[str], inputs: list[str],
              stream: TextIO | None = None) -> int:
    """Score image files and write one JSON line each; return 1 if any file failed, else 0."""
    stream = stream or sys.stdout
    evaluator = build_evaluator(evaluator_name, concept_name, sets)
    paths = expand_image_paths(inputs)
    if not paths:
        raise ScoringError(f"no PNG or JPEG files found in {', '.join(map(str, inputs))}")

    failed = 0
    for result in score_files(evaluator, paths):
        failed += "error" in result
        stream.write(json.dumps(result, default=_json_default) + "\n")
        stream.flush()
    return 1 if failed else 0


def _json_default(value: Any) -> Any:
    """Convert numpy scalars and arrays in verdict details to JSON types."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"{type(value).__name__} in an evaluator's details is not JSON serializable")
