"""Concepts are data: a YAML file names the erase phrase, prompt set, evaluator and retain set.

A new concept needs only a file like this, passed as ``--concept path/to/concept.yaml`` or
dropped into ``benchmark/data/concepts/``::

    name: circle
    description: The circle shape of the default world
    kind: object                      # object, style or nudity
    erase_phrase: circle              # the phrase an erasure method removes
    model: world                      # the model the concept is meant for
    prompts: {file: ../prompts/world_circle.csv, sha256: 3f2a...}
    evaluator: {name: world-classifier, settings: {attribute: shape, target: circle}}
    retain: {file: ../prompts/world_retain.csv, sha256: 9b1c...}
    fid_reference: {render: world_retain}   # or {folder: PATH}; see benchmark.fid_reference
    overrides: {attack/unlearndiffatk: {k: 3}}

File paths are relative to the YAML file. ``sha256`` pins each prompt file, and a file that no
longer matches is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from benchmark.fid_reference import FIDReference, parse_fid_reference
from benchmark.paths import DATA_DIR
from benchmark.prompts import PromptSet, load_prompt_set
from benchmark.registry import CONCEPTS

CONCEPTS_DIR = DATA_DIR / "concepts"
KINDS = ("object", "style", "nudity", "other")


class ConceptError(ValueError):
    """A concept file is missing or invalid."""


@dataclass(frozen=True)
class PromptFile:
    path: Path
    sha256: str | None


@dataclass
class Concept:
    """A concept to erase and attack: its phrase, prompts, judge and retain prompts."""

    name: str
    erase_phrase: str
    prompts: PromptFile
    evaluator: str
    evaluator_settings: dict = field(default_factory=dict)
    kind: str = "other"
    description: str = ""
    model: str | None = None
    retain: PromptFile | None = None
    # The images that FID compares the retain prompts' generated images with.
    fid_reference: FIDReference | None = None
    default_guidance: float = 7.5
    overrides: dict = field(default_factory=dict)
    source: str = ""

    def load_prompts(self, global_seed: int = 0, path: str | Path | None = None) -> PromptSet:
        """Load the concept's prompt set, or ``path`` in its place (then unpinned)."""
        if path is not None:
            return load_prompt_set(path, default_guidance=self.default_guidance, global_seed=global_seed)
        return load_prompt_set(
            self.prompts.path, prompt_set_id=f"{self.name}", expected_sha256=self.prompts.sha256,
            default_guidance=self.default_guidance, global_seed=global_seed,
        )

    def load_retain(self, global_seed: int = 0) -> PromptSet | None:
        if self.retain is None:
            return None
        return load_prompt_set(
            self.retain.path, prompt_set_id=f"{self.name}-retain", expected_sha256=self.retain.sha256,
            default_guidance=self.default_guidance, global_seed=global_seed,
        )


def _prompt_file(entry: Any, base: Path, key: str, source: Path) -> PromptFile:
    if isinstance(entry, str):
        entry = {"file": entry}
    if not isinstance(entry, dict) or "file" not in entry:
        raise ConceptError(f"{source}: {key} must be a file path or {{file: ..., sha256: ...}}")
    path = (base / entry["file"]).resolve()
    if not path.is_file():
        raise ConceptError(f"{source}: {key} file not found: {path}")
    return PromptFile(path, entry.get("sha256"))


def load_concept_file(path: str | Path) -> Concept:
    """Read a concept YAML file and check its fields."""
    path = Path(path)
    if not path.is_file():
        raise ConceptError(f"concept file not found: {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConceptError(f"{path}: a concept file is a mapping of keys, e.g. 'name: circle'")

    valid = {"name", "description", "kind", "erase_phrase", "model", "prompts", "evaluator", "retain",
             "fid_reference", "default_guidance", "overrides"}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConceptError(f"{path}: unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    for key in ("name", "erase_phrase", "prompts", "evaluator"):
        if key not in data:
            raise ConceptError(f"{path}: missing required key {key!r}")

    evaluator = data["evaluator"]
    if isinstance(evaluator, str):
        evaluator = {"name": evaluator}
    kind = data.get("kind", "other")
    if kind not in KINDS:
        raise ConceptError(f"{path}: invalid kind {kind!r}; valid: {', '.join(KINDS)}")

    base = path.parent
    return Concept(
        name=str(data["name"]),
        erase_phrase=str(data["erase_phrase"]),
        prompts=_prompt_file(data["prompts"], base, "prompts", path),
        evaluator=evaluator["name"],
        evaluator_settings=dict(evaluator.get("settings") or {}),
        kind=kind,
        description=str(data.get("description", "")),
        model=data.get("model"),
        retain=_prompt_file(data["retain"], base, "retain", path) if data.get("retain") else None,
        fid_reference=parse_fid_reference(data["fid_reference"], base, path) if data.get("fid_reference") else None,
        default_guidance=float(data.get("default_guidance", 7.5)),
        overrides=dict(data.get("overrides") or {}),
        source=str(path),
    )


def _register_shipped_concepts() -> None:
    for path in sorted(CONCEPTS_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        name = data.get("name", path.stem)
        if name not in CONCEPTS:
            loader = partial(load_concept_file, path)
            loader.description = data.get("description") or f"concept file {path.name}"
            CONCEPTS.register(name, loader)


def resolve_concept(name_or_path: str) -> Concept:
    """Return a registered concept by name, or load a concept YAML file by path."""
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_concept_file(name_or_path)
    factory = CONCEPTS.get(name_or_path)
    concept = factory() if callable(factory) else factory
    if isinstance(concept, (str, Path)):
        concept = load_concept_file(concept)
    if not isinstance(concept, Concept):
        raise ConceptError(f"concept plug-in {name_or_path!r} returned {type(concept).__name__}, not a Concept")
    return concept


_register_shipped_concepts()
