"""The CSV and Markdown views of the ranked tables, and the formatting they share with the HTML page.

Both outputs depend on the entries alone (no dates, no absolute paths), so the same entries
always give the same bytes.
"""

from __future__ import annotations

import csv
import io
import json

from leaderboard.schema import SCHEMA_VERSION
from leaderboard.tables import Row, Table, evaluator_settings, relative_path

CSV_COLUMNS = (
    "concept", "defense", "attack", "model", "provenance", "protocol", "rank",
    "pre_attack_asr", "pre_attack_asr_ci95_low", "pre_attack_asr_ci95_high",
    "asr", "asr_ci95_low", "asr_ci95_high",
    "n_prompts", "n_counted", "n_images", "n_invalid",
    "fid", "fid_n_images", "clip_score", "clip_score_n_images", "retain_accuracy", "retain_accuracy_n_images",
    "defense_version", "defense_config", "attack_version", "attack_config",
    "evaluator", "evaluator_version", "evaluator_weights_sha256", "evaluator_threshold", "evaluator_classes",
    "evaluator_settings", "prompt_set_sha256", "base_weights_sha256", "erased_weights_sha256",
    "sampler", "steps", "resolution", "guidance", "seeds",
    "suite_version", "suite_git_sha", "libraries", "run_key",
    "source", "notes", "schema_version",
)
UTILITY_LABELS = {"fid": "FID", "clip_score": "CLIP score", "retain_accuracy": "Retain accuracy"}
# A cell starting with one of these is run as a formula by spreadsheet programs (CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


# ----------------------------------------------------------------------------------------
# Shared formatting


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def interval_percent(interval: list | None) -> str:
    return "n/a" if interval is None else f"{percent(interval[0])}-{percent(interval[1])}"


def utility_text(metric: dict, name: str) -> str:
    """Format a utility value for tables: rates as percentages, FID and CLIP score as numbers, else 'n/a'."""
    value = metric.get("value")
    if value is None:
        return "n/a"
    if name == "retain_accuracy":
        return percent(value)
    return f"{value:.2f}" if name == "fid" else f"{value:.3f}"


def compact_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def source_text(entry: dict) -> str:
    if entry["provenance"] == "reported":
        source = entry["source"]
        return f"{source['title']} ({source['location']})"
    manifest = entry["run"]["manifest"]
    return f"run {entry['run']['run_key']} at suite {manifest['environment']['git_sha']}"


def provenance_items(entry: dict) -> list[tuple[str, str]]:
    """Return (label, text) pairs that state where an entry's numbers come from, for the page's details."""
    items: list[tuple[str, str]] = []
    if entry["provenance"] == "reported":
        source = entry["source"]
        items += [("source", source["title"]), ("location", source["location"]),
                  ("method as printed", source["method_label"])]
        items += [("also printed in", text) for text in source.get("see_also", [])]
        items.append(("protocol", entry["protocol"]["description"]))
    else:
        manifest = entry["run"]["manifest"]
        plan, environment, evaluator = manifest["plan"], manifest["environment"], manifest["evaluator"]
        items += [
            ("suite", f"{environment['suite_version']} at {environment['git_sha']}"),
            ("run key", entry["run"]["run_key"]),
            ("defense", f"{plan['defense']['name']} v{plan['defense']['version']} {compact_json(plan['defense']['config'])}"),
            ("attack", f"{plan['attack']['name']} v{plan['attack']['version']} {compact_json(plan['attack']['config'])}"),
            ("evaluator", f"{evaluator['name']} v{evaluator['version']}, weights sha256 {evaluator['weights_sha256']}, "
                          f"settings {compact_json(evaluator_settings(manifest))}"),
            ("prompt set", f"{plan['prompt_set']['id']}: {plan['prompt_set']['n_prompts']} prompts, "
                           f"sha256 {plan['prompt_set']['sha256']}"),
            ("base weights sha256", compact_json(manifest["model"]["base_sha256"])),
            ("erased weights sha256", compact_json(manifest["model"]["erased_sha256"])),
            ("sampling", f"{manifest['sampling']['sampler']}, {manifest['sampling']['steps']} steps, "
                         f"{manifest['sampling']['resolution']} px, guidance "
                         f"{guidance_text(plan['generation']['guidance_scale'])}"),
            ("seeds", f"{plan['seeds']}; run seed {plan['run']['seed']}"),
            ("libraries", ", ".join(f"{name} {version}" for name, version in sorted(environment["libraries"].items()))),
        ]
    for name, label in UTILITY_LABELS.items():
        metric = entry["utility"][name]
        if metric.get("value") is None:
            items.append((label, f"{metric['status']}: {metric.get('reason') or 'no reason given'}"))
        else:
            images = "images not stated" if metric.get("n_images") is None else f"{metric['n_images']} images"
            items.append((label, f"{utility_text(metric, name)} ({metric['status']}, {images})"))
    items += [("note", note) for note in entry.get("notes", [])]
    items.append(("entry file", str(relative_path(entry))))
    return items


def guidance_text(guidance: float) -> str:
    return "per prompt" if guidance < 0 else f"{guidance:g}"


# ----------------------------------------------------------------------------------------
# CSV


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.4f}"
    elif isinstance(value, (dict, list)):
        text = compact_json(value)
    else:
        text = str(value)
    # A leading quote makes spreadsheets read the cell as text instead of running it as a formula.
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def _run_columns(entry: dict) -> dict:
    if entry["provenance"] != "measured":
        return {}
    manifest = entry["run"]["manifest"]
    plan, evaluator, environment = manifest["plan"], manifest["evaluator"], manifest["environment"]
    settings = evaluator_settings(manifest)
    guidance = plan["generation"]["guidance_scale"]
    return {
        "defense_version": plan["defense"]["version"],
        "defense_config": plan["defense"]["config"],
        "attack_version": plan["attack"]["version"],
        "attack_config": plan["attack"]["config"],
        "evaluator": evaluator["name"],
        "evaluator_version": evaluator["version"],
        "evaluator_weights_sha256": evaluator["weights_sha256"],
        "evaluator_threshold": settings.get("threshold"),
        "evaluator_classes": settings.get("classes", settings.get("class_label", settings.get("target"))),
        "evaluator_settings": settings,
        "prompt_set_sha256": plan["prompt_set"]["sha256"],
        "base_weights_sha256": manifest["model"]["base_sha256"],
        "erased_weights_sha256": manifest["model"]["erased_sha256"],
        "sampler": manifest["sampling"]["sampler"],
        "steps": manifest["sampling"]["steps"],
        "resolution": manifest["sampling"]["resolution"],
        "guidance": "per prompt" if guidance < 0 else guidance,
        "seeds": plan["seeds"],
        "suite_version": environment["suite_version"],
        "suite_git_sha": environment["git_sha"],
        "libraries": environment["libraries"],
        "run_key": entry["run"]["run_key"],
    }


def csv_values(row: Row, table: Table) -> dict:
    entry = row.entry
    values = {key: entry.get(key) for key in CSV_COLUMNS if key in entry}
    values.update(protocol=table.protocol.key, rank=row.rank, schema_version=SCHEMA_VERSION)
    for key in ("pre_attack_asr", "asr"):
        interval = entry[f"{key}_ci95"] or [None, None]
        values[f"{key}_ci95_low"], values[f"{key}_ci95_high"] = interval
    for name in UTILITY_LABELS:
        values[name] = entry["utility"][name]["value"]
        values[f"{name}_n_images"] = entry["utility"][name]["n_images"]
    values.update(_run_columns(entry))
    if entry["provenance"] == "reported":
        values["source"] = source_text(entry)
    values["notes"] = " | ".join(entry.get("notes", [])) or None
    return values


def render_csv(tables: list[Table]) -> str:
    """Render one row per entry, in table order (concept, protocol, rank), with the run's provenance in columns."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for table in tables:
        for row in table.rows:
            values = csv_values(row, table)
            writer.writerow([_csv_cell(values.get(column)) for column in CSV_COLUMNS])
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------
# Markdown

MARKDOWN_HEADER = """\
# Leaderboard

Generated by `python -m benchmark leaderboard` from the files in `leaderboard/entries/`; edit
those, never this file. `leaderboard.csv` contains the same rows with their full provenance, and
`docs/leaderboard.md` describes the entry format and how to submit one.

Each table ranks the entries of one concept that were evaluated under one protocol, by ASR
(lower is better, equal ASR gives equal rank). ASR is the share of prompts whose image shows the
concept before or after the attack; pre-attack ASR counts the plain prompts alone. Rates are in
percent, and intervals are 95% bootstrap intervals. **measured** rows are runs of this suite.
**reported** rows are copied from the cited source, were not re-run here, and rank only against
rows of the same source protocol. [Protocols](#protocols), at the end, describes each protocol key.
"""

MARKDOWN_COLUMNS = ("Rank", "Defense", "Attack", "Pre-attack ASR", "ASR", "ASR 95% CI", "FID", "CLIP",
                    "Retain acc.", "Prompts", "Provenance", "Entry")


def _markdown_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |"


def _markdown_table(table: Table) -> list[str]:
    protocol = table.protocol
    lines = [f"### {protocol.provenance}: protocol `{protocol.key}`", ""]
    lines.append(_markdown_row(list(MARKDOWN_COLUMNS)))
    lines.append("|" + "|".join("---:" if name in ("Rank", "Prompts") else "---" for name in MARKDOWN_COLUMNS) + "|")

    notes = []
    for row in table.rows:
        entry = row.entry
        mark = "measured" if entry["provenance"] == "measured" else "reported"
        utility = entry["utility"]
        lines.append(_markdown_row([
            str(row.rank), entry["defense"], entry["attack"], percent(entry["pre_attack_asr"]), percent(entry["asr"]),
            interval_percent(entry["asr_ci95"]), utility_text(utility["fid"], "fid"),
            utility_text(utility["clip_score"], "clip_score"),
            utility_text(utility["retain_accuracy"], "retain_accuracy"),
            "n/a" if entry["n_prompts"] is None else str(entry["n_prompts"]), mark,
            f"[json](entries/{relative_path(entry)})",
        ]))
        for note in entry.get("notes", []):
            notes.append(f"- {entry['defense']} x {entry['attack']}: {_markdown_cell(note)}")

    sources = sorted({source_text(row.entry) for row in table.rows if row.entry["provenance"] == "reported"})
    if sources:
        lines += ["", "Source: " + "; ".join(_markdown_cell(text) for text in sources)]
    if notes:
        lines += ["", "Notes:", ""] + notes
    return lines + [""]


def _markdown_protocols(tables: list[Table]) -> list[str]:
    """List each protocol key once, however many tables use it, with its description."""
    protocols = {table.protocol.key: table.protocol for table in tables}
    lines = ["## Protocols", ""]
    for key in sorted(protocols):
        lines += [f"- `{key}` ({protocols[key].provenance}): {_markdown_cell(protocols[key].summary)}"]
    return lines + [""]


def render_markdown(tables: list[Table]) -> str:
    lines = [MARKDOWN_HEADER]
    if not tables:
        lines.append("No entries yet.\n")
    concept = None
    for table in tables:
        if table.concept != concept:
            concept = table.concept
            lines += [f"## {concept}", ""]
        lines += _markdown_table(table)
    if tables:
        lines += _markdown_protocols(tables)
    return "\n".join(lines).rstrip("\n") + "\n"
