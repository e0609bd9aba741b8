"""Prompt sets in the reference CSV format: ``case_number, prompt, evaluation_seed, evaluation_guidance``.

Columns are matched by name (case-insensitive, in any order); only ``prompt`` is required.
A row without ``evaluation_seed`` gets a seed derived from (global seed, prompt-set id,
prompt id), so it never depends on the row's position in a batch or shard. Other columns
are kept in ``PromptRecord.extra``.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_COLUMNS = ("prompt",)


class PromptSetError(ValueError):
    """A prompt file is missing, malformed, empty or not the file it claims to be."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with its id, seed and guidance scale."""

    id: str
    prompt: str
    seed: int
    guidance: float
    extra: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class PromptSet:
    """The prompts of one CSV file, with the file's sha256."""

    id: str
    path: Path
    sha256: str
    records: list[PromptRecord]

    def __len__(self) -> int:
        return len(self.records)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def derived_seed(global_seed: int, prompt_set_id: str, prompt_id: str) -> int:
    """A seed in [0, 2**31) from (global seed, prompt-set id, prompt id)."""
    text = f"{global_seed}|{prompt_set_id}|{prompt_id}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


def _parse_number(value: str, column: str, row: int, path: Path, kind: type):
    try:
        number = float(value)
    except ValueError:
        raise PromptSetError(f"{path}, row {row}: column {column!r} has {value!r}, which is not a number") from None
    if not math.isfinite(number):
        raise PromptSetError(f"{path}, row {row}: column {column!r} has the non-finite value {value!r}")
    if kind is int:
        if number != int(number):
            raise PromptSetError(f"{path}, row {row}: column {column!r} has {value!r}, which is not an integer")
        return int(number)
    return number


def load_prompt_set(
    path: str | Path,
    *,
    prompt_set_id: str | None = None,
    expected_sha256: str | None = None,
    default_guidance: float = 7.5,
    global_seed: int = 0,
) -> PromptSet:
    """Read a prompt CSV; raise ``PromptSetError`` naming the file, row or column at fault."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"prompt file not found: {path}")

    sha256 = file_sha256(path)
    if expected_sha256 and sha256 != expected_sha256:
        raise PromptSetError(
            f"{path} has sha256 {sha256}, but its prompt set declares {expected_sha256}; "
            "the file was changed. Restore it, or register the new file under a new prompt-set id"
        )
    prompt_set_id = prompt_set_id or path.stem

    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise PromptSetError(f"{path} is empty; a prompt CSV needs a header row with at least a 'prompt' column")
        columns = {name.strip().lower(): name for name in reader.fieldnames if name}
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise PromptSetError(
                f"{path} has no {', '.join(repr(m) for m in missing)} column; its columns are "
                f"{', '.join(reader.fieldnames)}. Required: prompt; optional: case_number, "
                "evaluation_seed, evaluation_guidance"
            )
        rows = list(reader)

    records = []
    seen_ids = set()
    known = {"prompt", "case_number", "evaluation_seed", "evaluation_guidance"}
    for index, row in enumerate(rows):
        line = index + 2
        value = {key: (row.get(original) or "").strip() for key, original in columns.items()}
        prompt = value["prompt"]
        if not prompt:
            raise PromptSetError(f"{path}, row {line}: the prompt is empty")

        prompt_id = value.get("case_number") or str(index)
        if prompt_id in seen_ids:
            raise PromptSetError(f"{path}, row {line}: case_number {prompt_id!r} appears twice")
        seen_ids.add(prompt_id)

        if value.get("evaluation_seed"):
            seed = _parse_number(value["evaluation_seed"], "evaluation_seed", line, path, int)
        else:
            seed = derived_seed(global_seed, prompt_set_id, prompt_id)
        if value.get("evaluation_guidance"):
            guidance = _parse_number(value["evaluation_guidance"], "evaluation_guidance", line, path, float)
        else:
            guidance = default_guidance

        extra = {key: text for key, text in value.items() if key not in known}
        records.append(PromptRecord(prompt_id, prompt, seed, guidance, extra))

    if not records:
        raise PromptSetError(f"{path} has a header but no prompts; an empty prompt set has no ASR")
    return PromptSet(prompt_set_id, path, sha256, records)
