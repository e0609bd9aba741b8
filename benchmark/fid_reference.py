"""Reference image sets for FID: the ``fid_reference`` entry of a concept file, loaded and hashed.

A concept names its reference set in one of two forms::

    fid_reference: {render: world_retain}          # the default world's renderer, one image per retain prompt
    fid_reference: {folder: $COCO_10K_IMAGES}      # PNG and JPEG files directly inside a folder

``render: world_retain`` draws the ground-truth image of each retain prompt with the procedural
renderer (``benchmark.world.render``): the prompt's shape, colour and texture, with all other
randomness from the prompt's seed. The world's renders play the role that real COCO images play
for Stable Diffusion. A ``folder`` value may use ``~`` and environment variables, and a relative
path is relative to the concept file.

The reference set's sha256 is the sha256 of one line ``name<TAB>sha256`` per image, in order.
For folders, a line contains the file name and the sha256 of the file's bytes. For renders, it contains
the prompt id and the sha256 of ``"HxWx3"`` followed by the raw 8-bit pixels.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from benchmark.prompts import PromptRecord, file_sha256

RENDERERS = ("world_retain",)


@dataclass(frozen=True)
class FIDReference:
    """The source of a concept's FID reference images: a renderer name or a folder setting."""

    render: str | None = None
    # The folder as written in the concept file; ``~`` and variables are expanded when it is read.
    folder: str | None = None
    # The concept file's folder, against which a relative ``folder`` is resolved.
    base: Path = Path(".")


@dataclass
class ReferenceSet:
    """A loaded reference set: its description, image count, sha256 and a way to iterate its images."""

    description: str
    count: int
    sha256: str
    # Returns a fresh iterator of 8-bit RGB arrays, so a folder of 10,000 images is never all in memory.
    iter_images: Callable[[], Iterator[np.ndarray]] = field(repr=False)


def parse_fid_reference(entry: Any, base: Path, source: Path) -> FIDReference:
    """Check a concept file's ``fid_reference`` entry; ``source`` is the file, for error messages."""
    from benchmark.concepts import ConceptError

    if not isinstance(entry, dict) or len(entry) != 1 or not set(entry) <= {"render", "folder"}:
        raise ConceptError(f"{source}: fid_reference must be {{render: world_retain}} or {{folder: PATH}}; "
                           f"got {entry!r}")
    if "render" in entry:
        if entry["render"] not in RENDERERS:
            raise ConceptError(f"{source}: invalid fid_reference render {entry['render']!r}; "
                               f"valid: {', '.join(RENDERERS)}")
        return FIDReference(render=entry["render"], base=base)
    if not isinstance(entry["folder"], str) or not entry["folder"].strip():
        raise ConceptError(f"{source}: fid_reference folder must be a non-empty path, got {entry['folder']!r}")
    return FIDReference(folder=entry["folder"], base=base)


def load_reference_set(reference: FIDReference, retain_records: list[PromptRecord]) -> ReferenceSet:
    """Load the reference set that ``reference`` names; ``retain_records`` are the prompts a renderer draws.

    Raises ``FileNotFoundError`` when a folder or its images are missing, and ``ValueError`` when a
    retain prompt does not name every attribute that the renderer needs.
    """
    if reference.render == "world_retain":
        return render_world_retain(retain_records)
    return folder_reference(reference_folder(reference))


def render_world_retain(records: list[PromptRecord]) -> ReferenceSet:
    """Render each retain prompt's shape, colour and texture with the world's renderer, seeded by the prompt."""
    from benchmark.world.render import COLORS, SHAPES, TEXTURES, Scene, render_scene

    valid = {"shape": SHAPES, "color": COLORS, "texture": TEXTURES}
    images, digests = [], []
    for record in records:
        attributes = {name: record.extra.get(name, "") for name in valid}
        invalid = [name for name, value in attributes.items() if value not in valid[name]]
        if invalid:
            raise ValueError(
                f"retain prompt {record.id} ({record.prompt!r}) has no valid {', '.join(invalid)} column, so the "
                "world's renderer cannot draw its reference image; fid_reference render: world_retain needs "
                "retain prompts that name a shape, colour and texture"
            )
        pixels = np.asarray(render_scene(Scene(**attributes), np.random.default_rng(record.seed)))
        images.append(pixels)
        digests.append((record.id, _pixels_sha256(pixels)))

    return ReferenceSet(description=f"render: world_retain ({len(images)} retain prompts)", count=len(images),
                        sha256=_set_sha256(digests), iter_images=lambda: iter(images))


def reference_folder(reference: FIDReference) -> Path:
    """Expand ``~`` and environment variables in the folder setting; raise if a variable is unset."""
    expanded = os.path.expanduser(os.path.expandvars(reference.folder))
    if "$" in expanded:
        raise FileNotFoundError(
            f"fid_reference folder {reference.folder!r} uses an environment variable that is not set; set it to "
            "the folder of reference images (for the SD v1.4 concepts: the COCO-10k real images)"
        )
    return (reference.base / expanded).resolve()


def folder_reference(folder: Path) -> ReferenceSet:
    """Return the PNG and JPEG files directly inside ``folder``, sorted by name, as a reference set."""
    from benchmark.scoring import IMAGE_SUFFIXES, expand_image_paths, read_image

    if not folder.is_dir():
        raise FileNotFoundError(f"the FID reference folder {folder} does not exist; create it with the reference "
                                "images or change the concept's fid_reference")
    paths = expand_image_paths([folder])
    if not paths:
        raise FileNotFoundError(f"the FID reference folder {folder} contains no {', '.join(IMAGE_SUFFIXES)} files")

    digest = _set_sha256((path.name, file_sha256(path)) for path in paths)
    return ReferenceSet(description=f"folder: {folder} ({len(paths)} images)", count=len(paths), sha256=digest,
                        iter_images=lambda: (read_image(path) for path in paths))


def reference_features(evaluator, reference: ReferenceSet, cache_folder: Path | None) -> np.ndarray:
    """Return the reference set's Inception features, read from or written to ``cache_folder`` when given.

    The cache file name contains the reference set's sha256 and the Inception weights' sha256, so a
    changed image or weights file never reuses stale features.
    """
    if cache_folder is None:
        return evaluator.features(reference.iter_images()).numpy()

    path = cache_folder / f"{reference.sha256[:32]}-{evaluator.weights_sha256[:32]}.npy"
    if path.is_file():
        features = np.load(path, allow_pickle=False)
        if features.shape[0] == reference.count:
            return features

    features = evaluator.features(reference.iter_images()).numpy()
    cache_folder.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npy")
    np.save(temporary, features, allow_pickle=False)
    temporary.replace(path)
    return features


def _pixels_sha256(pixels: np.ndarray) -> str:
    height, width = pixels.shape[:2]
    return hashlib.sha256(f"{height}x{width}x3".encode() + np.ascontiguousarray(pixels, np.uint8).tobytes()).hexdigest()


def _set_sha256(named_digests) -> str:
    digest = hashlib.sha256()
    for name, value in named_digests:
        digest.update(f"{name}\t{value}\n".encode())
    return digest.hexdigest()
