"""Leaderboard entries (one JSON file per cell) and the CSV generated from them.

An entry is the source of truth for one (concept, defense, attack, base model) cell; the CSV is
always regenerated from the entries and is byte-identical for the same entries.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

ENTRY_SCHEMA_VERSION = 1
LEADERBOARD_DIR = Path(__file__).resolve().parent
ENTRIES_DIR = LEADERBOARD_DIR / "entries"
CSV_PATH = LEADERBOARD_DIR / "leaderboard.csv"
CSV_COLUMNS = ("concept", "defense", "attack", "model", "provenance", "pre_attack_asr", "asr", "n_prompts",
               "n_invalid", "retain_accuracy", "source")
REQUIRED_FIELDS = {"schema_version": int, "concept": str, "defense": str, "attack": str, "model": str,
                   "provenance": str, "pre_attack_asr": float, "asr": float, "n_prompts": int}


class EntryError(ValueError):
    """A leaderboard entry is malformed."""


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def entry_path(entry: dict, root: Path = ENTRIES_DIR) -> Path:
    name = "__".join(_safe_name(entry[key]) for key in ("defense", "attack", "model"))
    return root / _safe_name(entry["concept"]) / f"{name}.json"


def entry_from_run(run_dir: Path) -> dict:
    """Build a ``measured`` entry from a finished run folder."""
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    retain = summary.get("utility", {}).get("retain_accuracy", {})
    return {
        "schema_version": ENTRY_SCHEMA_VERSION,
        "concept": summary["concept"],
        "defense": summary["defense"],
        "attack": summary["attack"],
        "model": summary["model"],
        "provenance": "measured",
        "pre_attack_asr": summary["pre_attack_asr"],
        "asr": summary["asr"],
        "pre_attack_asr_ci95": summary["pre_attack_asr_ci95"],
        "asr_ci95": summary["asr_ci95"],
        "n_prompts": summary["n_prompts"],
        "n_images": summary["n_images"],
        "n_invalid": summary["n_invalid"],
        "utility": {"retain_accuracy": retain.get("accuracy")},
        "run": {"run_key": summary["run_key"], "manifest": manifest},
    }


def validate_entry(entry: dict, source: str) -> None:
    for key, kind in REQUIRED_FIELDS.items():
        if key not in entry:
            raise EntryError(f"{source}: missing field {key!r}")
        value = entry[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise EntryError(f"{source}: field {key!r} must be {kind.__name__}, got {value!r}")
        if kind is float and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise EntryError(f"{source}: field {key!r} must be a finite rate in [0, 1], got {value!r}")
    if entry["provenance"] not in ("measured", "reported"):
        raise EntryError(f"{source}: field 'provenance' must be 'measured' or 'reported', got {entry['provenance']!r}")


def load_entries(root: Path = ENTRIES_DIR) -> list[dict]:
    entries = []
    for path in sorted(root.rglob("*.json")):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise EntryError(f"{path}: invalid JSON: {error}") from error
        validate_entry(entry, str(path))
        entries.append(entry)
    return entries


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    # A leading =, +, - or @ makes spreadsheets evaluate the cell as a formula.
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def render_csv(entries: list[dict]) -> str:
    rows = sorted(entries, key=lambda e: (e["concept"], e["asr"], e["pre_attack_asr"], e["defense"], e["attack"],
                                          e["model"], e["provenance"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in rows:
        values = {**entry, "retain_accuracy": (entry.get("utility") or {}).get("retain_accuracy"),
                  "source": entry.get("source", "")}
        writer.writerow([_csv_cell(values.get(column)) for column in CSV_COLUMNS])
    return buffer.getvalue()


def regenerate(root: Path = ENTRIES_DIR, csv_path: Path = CSV_PATH) -> Path:
    text = render_csv(load_entries(root))
    temporary = csv_path.with_name(csv_path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(csv_path)
    return csv_path


def publish(run_dir: Path, root: Path = ENTRIES_DIR) -> Path:
    entry = entry_from_run(run_dir)
    validate_entry(entry, str(run_dir))
    path = entry_path(entry, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
