"""Leaderboard entries: one JSON file per cell, the source of truth of every generated table.

A cell is (concept, defense, attack, base model, provenance). Entries live under
``leaderboard/entries/``::

    <concept>/<defense>__<attack>__<model>.json            measured by this suite
    <concept>/reported/<defense>__<attack>__<model>.json   copied from a publication

so a reported number and this suite's measurement of the same cell sit side by side. The
format is defined in ``leaderboard/schema.py`` and documented in ``docs/leaderboard.md``.
``regenerate`` rebuilds ``leaderboard.csv`` and ``LEADERBOARD.md`` (and optionally an HTML
page) from the entries, byte-identically for the same entries. It validates every entry
before it writes anything, so a malformed entry changes no file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from leaderboard.schema import SCHEMA_VERSION, EntryError, validate_entry
from leaderboard.tables import build_tables, relative_path

ENTRY_SCHEMA_VERSION = SCHEMA_VERSION
LEADERBOARD_DIR = Path(__file__).resolve().parent
ENTRIES_DIR = LEADERBOARD_DIR / "entries"
CSV_PATH = LEADERBOARD_DIR / "leaderboard.csv"
MARKDOWN_NAME = "LEADERBOARD.md"
HTML_NAME = "index.html"

# Summary keys of each utility metric: (entry name, summary name, value key, image-count key).
# Retain accuracy has no image count of its own; it judged the retain prompts' valid images.
SUMMARY_UTILITY = (
    ("fid", "fid", "fid", "n_generated"),
    ("clip_score", "clip-score", "clip_score", "n_images"),
    ("retain_accuracy", "retain_accuracy", "accuracy", None),
)

__all__ = ["ENTRY_SCHEMA_VERSION", "ENTRIES_DIR", "CSV_PATH", "EntryError", "entry_path", "read_entry",
           "load_entries", "entry_from_run", "publish", "regenerate", "validate_entry"]


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_object_without_duplicates)
    except _DuplicateKey as error:
        raise EntryError(f"{path}: field {error.args[0]!r} appears twice in one object; keep one") from None
    except json.JSONDecodeError as error:
        raise EntryError(f"{path}: invalid JSON: {error}") from error
    except UnicodeDecodeError as error:
        raise EntryError(f"{path}: not UTF-8 text: {error}") from error


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def entry_text(entry: dict) -> str:
    """The canonical file content of an entry: sorted keys, 2-space indent, final newline."""
    return json.dumps(entry, indent=2, sort_keys=True, allow_nan=False) + "\n"


# ----------------------------------------------------------------------------------------
# Reading


def entry_path(entry: dict, root: Path = ENTRIES_DIR) -> Path:
    return Path(root) / relative_path(entry)


def read_entry(path: Path, root: Path | None = None) -> dict:
    """Read and validate one entry file; with ``root``, also check that the file sits at its cell's path."""
    entry = _read_json(path)
    validate_entry(entry, str(path))
    if root is not None:
        expected = relative_path(entry)
        actual = Path(path).relative_to(root).as_posix()
        if actual != expected.as_posix():
            raise EntryError(f"{path}: the entry's concept, defense, attack, model and provenance place it at "
                             f"{expected}, not {actual}. Move the file there or fix those fields")
    return entry


def load_entries(root: Path = ENTRIES_DIR) -> list[dict]:
    """Read every ``*.json`` entry under ``root``, validated, in path order."""
    root = Path(root)
    if not root.is_dir():
        raise EntryError(f"entries folder {root} not found; pass an existing folder with --entries")
    return [read_entry(path, root) for path in sorted(root.rglob("*.json"))]


# ----------------------------------------------------------------------------------------
# Publishing a run


def _utility_metric(raw: dict | None, value_key: str, count_key: str | None) -> dict:
    if raw is None:
        return {"status": "unavailable", "value": None, "n_images": None,
                "reason": "the run's summary.json has no such metric"}

    if count_key is not None:
        n_images = raw.get(count_key)
    elif raw.get("n_prompts") is not None and raw.get("n_invalid") is not None:
        n_images = raw["n_prompts"] - raw["n_invalid"]
    else:
        n_images = None

    status, value, reason = raw.get("status"), raw.get(value_key), raw.get("reason")
    if status == "measured" and value is None:
        status, reason = "unavailable", reason or "the metric has no value (no valid images to compute it on)"
    elif status not in ("measured", "skipped", "unavailable"):
        status, reason = "unavailable", f"the run reported status {status!r}: {reason or 'no reason given'}"

    metric = {"status": status, "value": value if status == "measured" else None, "n_images": n_images,
              "reason": None if status == "measured" else reason}
    for key in ("n_reference", "prompt_set_sha256"):
        if raw.get(key) is not None:
            metric[key] = raw[key]
    return metric


def entry_from_run(run_dir: Path) -> dict:
    """Build a ``measured`` entry from a finished run folder (its summary.json and manifest.json)."""
    run_dir = Path(run_dir)
    for name in ("summary.json", "manifest.json"):
        if not (run_dir / name).is_file():
            raise EntryError(f"{run_dir}: no {name}; publish needs a finished run folder")
    summary = _read_json(run_dir / "summary.json")
    manifest = _read_json(run_dir / "manifest.json")

    if summary.get("asr") is None:
        raise EntryError(f"{run_dir}: no prompt was counted (n_counted is 0, e.g. every image was invalid), "
                         "so the run has no ASR to publish")
    model = summary["model"]
    if "/" in model or "\\" in model or model.endswith((".ckpt", ".safetensors")):
        raise EntryError(f"{run_dir}: the run's model {model!r} is a path, not a model name. Publish runs of a "
                         "registered model, e.g. --model sd-v1-4 with SD14_PATH pointing at the weights")

    utility = summary.get("utility", {})
    return {
        "schema_version": SCHEMA_VERSION,
        "concept": summary["concept"],
        "defense": summary["defense"],
        "attack": summary["attack"],
        "model": model,
        "provenance": "measured",
        "pre_attack_asr": summary["pre_attack_asr"],
        "pre_attack_asr_ci95": summary["pre_attack_asr_ci95"],
        "asr": summary["asr"],
        "asr_ci95": summary["asr_ci95"],
        "n_prompts": summary["n_prompts"],
        "n_counted": summary["n_counted"],
        "n_images": summary["n_images"],
        "n_invalid": summary["n_invalid"],
        "utility": {name: _utility_metric(utility.get(summary_name), value_key, count_key)
                    for name, summary_name, value_key, count_key in SUMMARY_UTILITY},
        "run": {"run_key": summary["run_key"], "seconds": summary.get("seconds", {}), "manifest": manifest},
    }


def publish(run_dir: Path, root: Path | None = None) -> Path:
    """Write the entry of a finished run under ``root`` (default: the shipped entries folder) and return its path.

    An existing entry of the same cell is replaced only when it comes from the same run
    configuration (same run key); otherwise this raises EntryError and writes nothing.
    """
    entry = entry_from_run(run_dir)
    validate_entry(entry, f"the entry built from {run_dir}")
    path = entry_path(entry, root or ENTRIES_DIR)

    if path.exists():
        existing = _read_json(path)
        run = existing.get("run") if isinstance(existing, dict) else None
        old_key = run.get("run_key") if isinstance(run, dict) else None
        if old_key != entry["run"]["run_key"]:
            raise EntryError(f"{path} already holds an entry for this cell (run key {old_key}); this run has run "
                             f"key {entry['run']['run_key']}. To replace it, delete {path} and publish again")

    _write_text_atomic(path, entry_text(entry))
    return path


# ----------------------------------------------------------------------------------------
# Generated files


def render_outputs(entries: list[dict], csv_path: Path, markdown_path: Path, html_dir: Path | None) -> dict[Path, str]:
    """Return the generated files' contents by path; raises EntryError before anything is written."""
    from leaderboard.page import render_page
    from leaderboard.render import render_csv, render_markdown

    tables = build_tables(entries)
    outputs = {csv_path: render_csv(tables), markdown_path: render_markdown(tables)}
    if html_dir is not None:
        outputs[Path(html_dir) / HTML_NAME] = render_page(tables)
    return outputs


def regenerate(root: Path = ENTRIES_DIR, csv_path: Path = CSV_PATH, markdown_path: Path | None = None,
               html_dir: Path | None = None) -> list[Path]:
    """Rebuild the CSV, the Markdown tables (default: LEADERBOARD.md next to the CSV) and optionally ``html_dir``/index.html.

    Returns the written paths. Every entry is read, validated and rendered first, so an error
    leaves every file as it was.
    """
    csv_path = Path(csv_path)
    markdown_path = Path(markdown_path) if markdown_path else csv_path.with_name(MARKDOWN_NAME)
    outputs = render_outputs(load_entries(root), csv_path, markdown_path, html_dir)
    for path, text in outputs.items():
        _write_text_atomic(path, text)
    return list(outputs)
