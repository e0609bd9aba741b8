"""Rankings: entries grouped by concept and evaluation protocol, sorted and ranked by ASR.

Two entries share a table only when they were evaluated under the same protocol, so that
every ranking compares like with like:

- A measured entry's protocol is read from its run's manifest. It consists of the base model
  (name and weights sha256), the prompt set (sha256 and number of prompts used) and the
  evaluator (name, version, weights sha256 and every setting that changes a verdict, such as
  the threshold and the class set). Sampler, steps, resolution, guidance and seed policy
  complete it.
- A reported entry's protocol is the ``protocol.id`` the entry names.

Measured and reported entries therefore never share a table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from leaderboard.schema import EntryError

# Evaluator settings that do not change a verdict: file locations (the weights sha256 stands for
# them), the device, and the batch size (evaluators score one image per forward pass).
MACHINE_SETTINGS = ("weights", "model_path", "device", "batch_size")
# Facts an evaluator's info() adds to its settings that change verdicts.
VERDICT_INFO = ("threshold", "classes", "class_id", "class_label")


@dataclass(frozen=True)
class Protocol:
    """The evaluation conditions that entries must share to be ranked together."""

    key: str
    provenance: str
    summary: str
    fields: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Row:
    entry: dict
    rank: int


@dataclass
class Table:
    concept: str
    protocol: Protocol
    rows: list[Row]


def cell_key(entry: dict) -> tuple[str, ...]:
    """Return the (concept, defense, attack, model, provenance) cell an entry fills; one entry per cell."""
    return tuple(entry[key] for key in ("concept", "defense", "attack", "model", "provenance"))


def relative_path(entry: dict) -> PurePosixPath:
    """Return the entry's file path relative to the entries folder."""
    name = "__".join(entry[key] for key in ("defense", "attack", "model")) + ".json"
    if entry["provenance"] == "reported":
        return PurePosixPath(entry["concept"], "reported", name)
    return PurePosixPath(entry["concept"], name)


# ----------------------------------------------------------------------------------------
# Protocols


def evaluator_settings(manifest: dict) -> dict:
    """Return the evaluator settings that change verdicts: its config without machine settings, plus threshold and classes from its info."""
    info = manifest["evaluator"]
    config = manifest["plan"]["evaluator"]["config"]
    settings = {key: value for key, value in config.items() if key not in MACHINE_SETTINGS}
    for key in VERDICT_INFO:
        if info.get(key) is not None:
            settings[key] = info[key]
    return settings


def measured_protocol_fields(entry: dict) -> dict:
    manifest = entry["run"]["manifest"]
    plan = manifest["plan"]
    return {
        "model": entry["model"],
        "base_sha256": manifest["model"]["base_sha256"],
        "prompt_set_sha256": plan["prompt_set"]["sha256"],
        "n_prompts": plan["prompt_set"]["n_prompts"],
        "evaluator": {
            "name": manifest["evaluator"]["name"],
            "version": manifest["evaluator"]["version"],
            "weights_sha256": manifest["evaluator"]["weights_sha256"],
            "settings": evaluator_settings(manifest),
        },
        "sampler": manifest["sampling"]["sampler"],
        "steps": manifest["sampling"]["steps"],
        "resolution": manifest["sampling"]["resolution"],
        "guidance_scale": plan["generation"]["guidance_scale"],
        "seeds": plan["seeds"],
    }


def _guidance_text(guidance: float) -> str:
    return "per-prompt guidance" if guidance < 0 else f"guidance {guidance:g}"


def _measured_summary(fields: dict) -> str:
    evaluator = fields["evaluator"]
    settings = ", ".join(f"{key} {_compact(value)}" for key, value in sorted(evaluator["settings"].items()))
    return (f"{fields['model']} (weights {_short_hashes(fields['base_sha256'])}); "
            f"{fields['n_prompts']} prompts of set {fields['prompt_set_sha256'][:8]}; "
            f"judge {evaluator['name']} v{evaluator['version']} ({settings}); "
            f"{fields['sampler']}, {fields['steps']} steps, {fields['resolution']} px, "
            f"{_guidance_text(fields['guidance_scale'])}")


def _compact(value) -> str:
    if isinstance(value, list):
        return "[" + " ".join(str(item) for item in value) + "]"
    return str(value)


def _short_hashes(hashes: dict) -> str:
    """Combine component hashes into one 8-digit digest, so that a summary shows one weights id."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:8]


def protocol_of(entry: dict) -> Protocol:
    """Return the protocol an entry was evaluated under."""
    if entry["provenance"] == "reported":
        protocol = entry["protocol"]
        return Protocol(f"reported:{protocol['id']}", "reported", protocol["description"], dict(protocol))

    fields = measured_protocol_fields(entry)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    return Protocol(f"measured:{digest}", "measured", _measured_summary(fields), fields)


# ----------------------------------------------------------------------------------------
# Tables


def sort_key(entry: dict) -> tuple:
    """Lower ASR first; ties broken by pre-attack ASR, then by name so the order is total."""
    return (entry["asr"], entry["pre_attack_asr"], entry["defense"], entry["attack"], entry["model"])


def _check_unique_cells(entries: list[dict]) -> None:
    seen: dict[tuple, int] = {}
    for index, entry in enumerate(entries):
        key = cell_key(entry)
        if key in seen:
            raise EntryError(f"duplicate entry for the cell concept {key[0]}, defense {key[1]}, attack {key[2]}, "
                             f"model {key[3]} ({key[4]}): {relative_path(entry)} is given twice. "
                             "Keep one entry per cell")
        seen[key] = index


def _check_reported_protocols(entries: list[dict]) -> None:
    """Reported entries that name the same protocol id must state the same description and base model."""
    first: dict[str, dict] = {}
    for entry in entries:
        if entry["provenance"] != "reported":
            continue
        protocol_id = entry["protocol"]["id"]
        known = first.setdefault(protocol_id, entry)
        for field_name, value, known_value in (
            ("protocol.description", entry["protocol"]["description"], known["protocol"]["description"]),
            ("model", entry["model"], known["model"]),
        ):
            if value != known_value:
                raise EntryError(f"{relative_path(entry)}: field {field_name!r} differs from the one in "
                                 f"{relative_path(known)}, which names the same protocol id {protocol_id!r}. "
                                 "Entries ranked together must share one protocol: make the field equal or "
                                 "choose another protocol id")


def rank(entries: list[dict]) -> list[Row]:
    """Sort entries by ``sort_key`` and give each its competition rank by ASR (equal ASR, equal rank)."""
    ordered = sorted(entries, key=sort_key)
    rows = []
    for index, entry in enumerate(ordered):
        if rows and rows[-1].entry["asr"] == entry["asr"]:
            rows.append(Row(entry, rows[-1].rank))
        else:
            rows.append(Row(entry, index + 1))
    return rows


def build_tables(entries: list[dict]) -> list[Table]:
    """Group validated entries into one ranked table per (concept, protocol), sorted by concept then protocol key."""
    _check_unique_cells(entries)
    _check_reported_protocols(entries)

    groups: dict[tuple[str, str], list[dict]] = {}
    protocols: dict[str, Protocol] = {}
    for entry in entries:
        protocol = protocol_of(entry)
        protocols[protocol.key] = protocol
        groups.setdefault((entry["concept"], protocol.key), []).append(entry)

    return [Table(concept, protocols[key], rank(group)) for (concept, key), group in sorted(groups.items())]
