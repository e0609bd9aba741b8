"""Leaderboard entries, their validation, the generated tables and the verify command."""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import shutil
from pathlib import Path

import jsonschema
import pytest

from benchmark.cli import main
from benchmark.paths import CACHE_VARIABLE
from leaderboard import entries as entries_module
from leaderboard.entries import (
    CSV_PATH, ENTRIES_DIR, EntryError, entry_from_run, entry_path, entry_text, load_entries, publish, regenerate,
    render_outputs,
)
from leaderboard.render import CSV_COLUMNS, render_csv
from leaderboard.schema import json_schema, json_schema_text, validate_entry
from leaderboard.tables import build_tables, protocol_of
from leaderboard.verify import binomial_tolerance, recorded_layers

SCHEMA_FILE = Path(entries_module.__file__).with_name("entry.schema.json")
CONCEPTS = ("nudity", "vangogh", "church", "garbage_truck", "parachute", "tench")

# Published SD v1.4 numbers, typed again from the UnlearnDiffAtk leaderboard (Hugging Face Space
# Intel/UnlearnDiffAtk-Benchmark): (concept, defense, pre-attack ASR %, ASR %, FID, CLIP score).
PUBLISHED_SAMPLE = (
    ("nudity", "advunlearn", 7.75, 21.13, 19.34, 0.290),
    ("nudity", "esd", 20.42, 76.05, 18.18, 0.302),
    ("nudity", "erasediff", 0.00, 2.11, 233, 0.180),
    ("nudity", "safree", 26.06, 85.59, 19.28, 0.259),
    ("vangogh", "esd", 2.00, 32.00, 18.71, 0.304),
    ("vangogh", "uce", 62.00, 94.00, 16.31, 0.311),
    ("vangogh", "rece", 14.00, 70.73, 24.89, 0.265),
    ("church", "fmn", 52.00, 96.00, 16.49, 0.308),
    ("church", "scissorhands", 0.00, 6.00, 68.02, 0.277),
    ("garbage_truck", "spm", 4.00, 82.00, 16.79, 0.31),
    ("parachute", "erasediff", 4.00, 82.00, 18.53, 0.309),
    ("tench", "salun", 0.00, 14.00, 17.97, 0.313),
)
REPORTED_COUNTS = {"nudity": 12, "vangogh": 9, "church": 7, "garbage_truck": 6, "parachute": 7, "tench": 7}


# ----------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished two-prompt run of the tiny random model (defense none, attack none)."""
    output = tmp_path_factory.mktemp("runs")
    # Module fixtures are set up before conftest's per-test private cache, so this one sets its own.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_VARIABLE, str(tmp_path_factory.mktemp("cache")))
        assert main(["run", "--model", "tiny-random", "--set", "run.max_prompts=2", "--set", "run.utility=false",
                     "--set", "run.grid_rows=0", "--no-progress", "--output", str(output)]) == 0
    (folder,) = output.iterdir()
    return folder


@pytest.fixture
def measured(run_dir) -> dict:
    return entry_from_run(run_dir)


def reported_entries() -> list[dict]:
    return [entry for entry in load_entries(ENTRIES_DIR) if entry["provenance"] == "reported"]


def write_entry(root: Path, entry: dict) -> Path:
    path = entry_path(entry, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(entry_text(entry))
    return path


def regenerate_into(tmp_path: Path, root: Path) -> list[Path]:
    return regenerate(root, tmp_path / "out" / "leaderboard.csv", html_dir=tmp_path / "out" / "html")


def variant(entry: dict, **changes) -> dict:
    """A copy of ``entry`` with changed top-level fields and manifest values (dotted keys after 'manifest.')."""
    changed = copy.deepcopy(entry)
    for key, value in changes.items():
        if key.startswith("manifest__"):
            target = changed["run"]["manifest"]
            *parents, last = key.removeprefix("manifest__").split("__")
            for parent in parents:
                target = target[parent]
            target[last] = value
        else:
            changed[key] = value
    return changed


# ----------------------------------------------------------------------------------------
# Shipped entries and generated files


def test_shipped_entries_are_valid():
    entries = load_entries(ENTRIES_DIR)
    assert len(entries) >= 48


def test_reported_entries_per_concept():
    counts = {}
    for entry in reported_entries():
        counts[entry["concept"]] = counts.get(entry["concept"], 0) + 1
    assert counts == REPORTED_COUNTS


@pytest.mark.parametrize(("concept", "defense", "pre", "asr", "fid", "clip"), PUBLISHED_SAMPLE)
def test_reported_numbers_match_source(concept, defense, pre, asr, fid, clip):
    path = ENTRIES_DIR / concept / "reported" / f"{defense}__unlearndiffatk__sd-v1-4.json"
    entry = json.loads(path.read_text())
    assert entry["pre_attack_asr"] == pytest.approx(pre / 100, abs=1e-9)
    assert entry["asr"] == pytest.approx(asr / 100, abs=1e-9)
    assert entry["utility"]["fid"]["value"] == pytest.approx(fid, abs=1e-9)
    assert entry["utility"]["clip_score"]["value"] == pytest.approx(clip, abs=1e-9)


def test_reported_entries_cite_source_without_run():
    for entry in reported_entries():
        assert entry["source"]["title"] and entry["source"]["location"], entry
        assert entry["protocol"]["id"], entry
        assert "run" not in entry
        assert entry["attack"] == "unlearndiffatk"
        assert entry["model"] == "sd-v1-4"


def test_garbage_truck_has_no_scissorhands_row():
    assert not (ENTRIES_DIR / "garbage_truck" / "reported" / "scissorhands__unlearndiffatk__sd-v1-4.json").exists()


def test_later_rows_ranked_apart():
    later = {entry["defense"] for entry in reported_entries()
             if entry["protocol"]["id"] == "unlearndiffatk-leaderboard-later-rows"}
    assert later == {"mace", "rece", "safree"}


def test_generated_files_are_up_to_date(tmp_path):
    """leaderboard.csv and LEADERBOARD.md must be regenerated whenever an entry changes."""
    regenerate(ENTRIES_DIR, tmp_path / "leaderboard.csv")
    assert (tmp_path / "leaderboard.csv").read_bytes() == CSV_PATH.read_bytes()
    assert (tmp_path / "LEADERBOARD.md").read_bytes() == CSV_PATH.with_name("LEADERBOARD.md").read_bytes()


def test_schema_file_is_up_to_date():
    assert SCHEMA_FILE.read_text() == json_schema_text()


def test_json_schema_accepts_entries(measured):
    validator = jsonschema.Draft202012Validator(json_schema())
    for entry in load_entries(ENTRIES_DIR) + [measured]:
        errors = [error.message for error in validator.iter_errors(entry)]
        assert errors == [], f"{entry['concept']}/{entry['defense']}: {errors}"


def test_json_schema_rejects_bad_entries(measured):
    validator = jsonschema.Draft202012Validator(json_schema())
    missing = {key: value for key, value in measured.items() if key != "asr"}
    reported_with_run = variant(reported_entries()[0], run=measured["run"])
    assert not validator.is_valid(missing)
    assert not validator.is_valid(reported_with_run)
    assert not validator.is_valid(variant(measured, defense="ESD X"))


# ----------------------------------------------------------------------------------------
# Regeneration


def test_regeneration_is_byte_identical(tmp_path, measured):
    root = tmp_path / "entries"
    shutil.copytree(ENTRIES_DIR, root)
    write_entry(root, measured)

    first = {path: path.read_bytes() for path in regenerate_into(tmp_path, root)}
    second = {path: path.read_bytes() for path in regenerate_into(tmp_path, root)}
    assert first == second


def test_output_ignores_entry_order(tmp_path, measured):
    entries = load_entries(ENTRIES_DIR) + [measured]
    shuffled = entries[:]
    random.Random(0).shuffle(shuffled)
    paths = (tmp_path / "a.csv", tmp_path / "a.md", tmp_path / "html")
    assert render_outputs(entries, *paths) == render_outputs(shuffled, *paths)


def test_csv_sorted_by_concept_then_asr():
    rows = list(csv.DictReader(CSV_PATH.read_text().splitlines()))
    keys = [(row["concept"], row["protocol"], float(row["asr"])) for row in rows]
    assert tuple(rows[0]) == CSV_COLUMNS
    assert keys == sorted(keys)
    assert keys[0][0] == "church"


def test_equal_asr_gets_equal_rank():
    church = [table for table in build_tables(reported_entries()) if table.concept == "church"]
    rows = church[0].rows
    assert [(row.entry["defense"], row.rank) for row in rows[:3]] == [
        ("advunlearn", 1), ("scissorhands", 1), ("erasediff", 3)]


def test_csv_header_and_measured_provenance(measured):
    text = render_csv(build_tables([measured]))
    header, row = text.splitlines()
    values = dict(zip(header.split(","), next(csv.reader([row]))))
    manifest = measured["run"]["manifest"]
    assert header.startswith("concept,defense,attack,model,provenance")
    assert values["suite_git_sha"] == manifest["environment"]["git_sha"]
    assert values["prompt_set_sha256"] == manifest["plan"]["prompt_set"]["sha256"]
    assert values["evaluator_weights_sha256"] == manifest["evaluator"]["weights_sha256"]
    assert values["sampler"] == manifest["sampling"]["sampler"]
    assert values["guidance"] == "per prompt"
    assert values["schema_version"] == "2"


def test_markdown_marks_reported_and_measured(tmp_path, measured):
    root = tmp_path / "entries"
    shutil.copytree(ENTRIES_DIR, root)
    write_entry(root, measured)
    regenerate_into(tmp_path, root)
    markdown = (tmp_path / "out" / "LEADERBOARD.md").read_text()

    assert "### measured: protocol `measured:" in markdown
    assert "### reported: protocol `reported:unlearndiffatk-leaderboard`" in markdown
    assert "| 1 | none | none |" in markdown
    assert markdown.count("| reported |") == len(reported_entries())


# ----------------------------------------------------------------------------------------
# Protocols


@pytest.mark.parametrize("change", [
    {"manifest__evaluator__version": "2"},
    {"manifest__evaluator__weights_sha256": "0" * 64},
    {"manifest__plan__evaluator__config__target": "square"},
    {"manifest__plan__prompt_set__sha256": "1" * 64},
    {"manifest__model__base_sha256": {"unet": "2" * 64}},
    {"manifest__sampling__steps": 50},
    {"manifest__plan__generation__guidance_scale": 3.0},
], ids=["evaluator-version", "evaluator-weights", "evaluator-setting", "prompt-set", "base-weights", "steps",
        "guidance"])
def test_incompatible_protocols_rank_apart(measured, change):
    other = variant(measured, defense="esd-x", **change)
    tables = build_tables([measured, other])
    assert len(tables) == 2
    assert protocol_of(measured).key != protocol_of(other).key


def test_compatible_entries_share_table(measured):
    other = variant(measured, defense="esd-x", asr=1.0, asr_ci95=[1.0, 1.0], run={
        **measured["run"], "run_key": "other", "manifest": {**measured["run"]["manifest"], "run_key": "other"}})
    (table,) = build_tables([measured, other])
    assert [row.entry["defense"] for row in table.rows] == ["none", "esd-x"]


def test_threshold_enters_protocol(measured):
    other = variant(measured, defense="esd-x")
    other["run"]["manifest"]["evaluator"]["threshold"] = 0.6
    assert protocol_of(measured).key != protocol_of(other).key
    assert "threshold 0.6" in protocol_of(other).summary


def test_reported_protocol_needs_one_description():
    first, second = copy.deepcopy(reported_entries()[:2])
    second["protocol"]["description"] = "something else"
    with pytest.raises(EntryError, match="protocol.description"):
        build_tables([first, second])


# ----------------------------------------------------------------------------------------
# Malformed entries: clear error naming file and field, nothing written


def _assert_rejected(tmp_path, capsys, root: Path, *fragments: str) -> None:
    out = tmp_path / "out"
    code = main(["leaderboard", "--entries", str(root), "--csv", str(out / "leaderboard.csv"), "--html", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    for fragment in fragments:
        assert fragment in err
    assert not out.exists()


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"asr": "0.5"}, "'asr'", "expected a number"),
    ({"n_prompts": 2.5}, "'n_prompts'", "expected an integer"),
    ({"provenance": "guessed"}, "'provenance'", "valid: measured, reported"),
    ({"asr": 1.5}, "'asr'", "above the maximum"),
    ({"asr": 0.0, "pre_attack_asr": 0.5, "pre_attack_asr_ci95": [0.5, 0.5]}, "'asr'", "below pre_attack_asr"),
    ({"asr": 0.2, "pre_attack_asr": 0.0, "pre_attack_asr_ci95": [0.0, 0.0], "asr_ci95": [0.4, 0.9]}, "'asr_ci95'",
     "does not contain"),
    ({"extra": 1}, "'extra'", "unknown field"),
], ids=["string-rate", "float-count", "provenance", "rate-above-one", "asr-below-pre", "interval", "unknown-field"])
def test_wrong_field_rejected(tmp_path, capsys, measured, change, field, message):
    root = tmp_path / "entries"
    path = write_entry(root, variant(measured, **change))
    _assert_rejected(tmp_path, capsys, root, path.name, field, message)


def test_missing_field_rejected(tmp_path, capsys, measured):
    root = tmp_path / "entries"
    entry = copy.deepcopy(measured)
    del entry["run"]["manifest"]["plan"]["prompt_set"]["sha256"]
    path = write_entry(root, entry)
    _assert_rejected(tmp_path, capsys, root, path.name, "missing field 'run.manifest.plan.prompt_set.sha256'")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_number_rejected(tmp_path, capsys, measured, value):
    root = tmp_path / "entries"
    path = entry_path(measured, root)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(variant(measured, asr=value)))
    _assert_rejected(tmp_path, capsys, root, path.name, "'asr'", "finite")


def test_duplicate_key_rejected(tmp_path, capsys, measured):
    root = tmp_path / "entries"
    path = write_entry(root, measured)
    path.write_text(path.read_text().replace('"asr": ', '"asr": 0.5,\n  "asr": ', 1))
    _assert_rejected(tmp_path, capsys, root, path.name, "'asr' appears twice")


def test_duplicate_cell_rejected(tmp_path, capsys, measured):
    root = tmp_path / "entries"
    path = write_entry(root, measured)
    shutil.copy(path, path.with_name("copy.json"))
    _assert_rejected(tmp_path, capsys, root, "copy.json", "place it at circle/none__none__tiny-random.json")


def test_duplicate_cell_in_memory_rejected(measured):
    with pytest.raises(EntryError, match="duplicate entry for the cell concept circle, defense none"):
        build_tables([measured, copy.deepcopy(measured)])


@pytest.mark.parametrize("name", ["=cmd", "+1", "-x", "@sum", "ESD", "a/b", "a b", "a__b", "..", "\tx", ""])
def test_unsafe_name_rejected(tmp_path, capsys, measured, name):
    entry = variant(measured, defense=name)
    with pytest.raises(EntryError, match="field 'defense'"):
        validate_entry(entry, "entry.json")


@pytest.mark.parametrize("text", ["line\nbreak", "tab\there", "\rcarriage"])
def test_control_character_in_text_rejected(text):
    entry = copy.deepcopy(reported_entries()[0])
    entry["source"]["title"] = text
    with pytest.raises(EntryError, match="field 'source.title'"):
        validate_entry(entry, "entry.json")


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@"])
def test_csv_cell_never_starts_a_formula(prefix):
    entry = copy.deepcopy(reported_entries()[0])
    entry["notes"] = [f"{prefix}HYPERLINK(\"http://example.invalid\")"]
    entry["source"]["title"] = f"{prefix}1+1"
    text = render_csv(build_tables([entry]))
    for row in csv.reader(text.splitlines()):
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell


def test_reported_entry_with_run_rejected(measured):
    entry = variant(reported_entries()[0], run=measured["run"])
    with pytest.raises(EntryError, match="field 'run': only measured entries"):
        validate_entry(entry, "entry.json")


def test_old_schema_version_rejected(measured):
    with pytest.raises(EntryError, match="version 1 is not supported"):
        validate_entry(variant(measured, schema_version=1), "entry.json")


def test_malformed_entry_keeps_outputs(tmp_path, capsys, measured):
    root = tmp_path / "entries"
    write_entry(root, measured)
    out = tmp_path / "out"
    regenerate(root, out / "leaderboard.csv")
    before = {path: path.read_bytes() for path in out.iterdir()}

    write_entry(root, variant(measured, defense="esd-x", asr="high"))
    assert main(["leaderboard", "--entries", str(root), "--csv", str(out / "leaderboard.csv")]) == 2
    assert {path: path.read_bytes() for path in out.iterdir()} == before


# ----------------------------------------------------------------------------------------
# Publishing


def test_publish_writes_measured_entry(tmp_path, run_dir):
    path = publish(run_dir, tmp_path)
    entry = json.loads(path.read_text())

    assert path == tmp_path / "circle" / "none__none__tiny-random.json"
    assert entry["schema_version"] == 2
    assert entry["n_prompts"] == 2
    assert entry["n_images"] == 4
    assert entry["utility"]["retain_accuracy"]["status"] == "skipped"
    assert entry["run"]["manifest"]["environment"]["git_sha"]
    assert entry["run"]["manifest"]["model"]["erased_sha256"]


def test_publish_again_same_run_replaces(tmp_path, run_dir):
    first = publish(run_dir, tmp_path).read_bytes()
    assert publish(run_dir, tmp_path).read_bytes() == first


def test_publish_other_run_keeps_entry(tmp_path, run_dir, measured):
    path = write_entry(tmp_path, variant(measured, run={**measured["run"], "run_key": "other"}))
    before = path.read_bytes()
    with pytest.raises(EntryError, match="already holds an entry for this cell"):
        publish(run_dir, tmp_path)
    assert path.read_bytes() == before


def test_publish_rejects_model_path(tmp_path, run_dir):
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    summary = json.loads((broken / "summary.json").read_text())
    summary["model"] = "/models/sd.safetensors"
    (broken / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(EntryError, match="is a path, not a model name"):
        publish(broken, tmp_path / "entries")
    assert not (tmp_path / "entries").exists()


def test_publish_rejects_unfinished_run(tmp_path):
    with pytest.raises(EntryError, match="no summary.json"):
        publish(tmp_path, tmp_path / "entries")


def test_run_publish_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(entries_module, "ENTRIES_DIR", tmp_path / "entries")
    assert main(["run", "--model", "tiny-random", "--set", "run.max_prompts=1", "--set", "run.utility=false",
                 "--set", "run.grid_rows=0", "--no-progress", "--output", str(tmp_path / "runs"), "--publish"]) == 0
    entry = json.loads((tmp_path / "entries" / "circle" / "none__none__tiny-random.json").read_text())
    assert entry["provenance"] == "measured"
    assert entry["n_prompts"] == 1


# ----------------------------------------------------------------------------------------
# Verify


def test_binomial_tolerance():
    assert binomial_tolerance(0.5, 10, 0.99) == (0.1, 0.9)
    assert binomial_tolerance(0.0, 10, 0.99) == (0.0, 0.0)
    low, high = binomial_tolerance(0.3, 100, 0.95)
    assert low < 0.3 < high
    assert math.isclose(high - 0.3, 0.3 - low, abs_tol=0.02)


def test_verify_pins_resolved_sampling(measured):
    """Empty generation settings follow the model's defaults, so verify replays the resolved ones."""
    manifest = measured["run"]["manifest"]
    layers = recorded_layers(measured, 3, "cpu")
    assert manifest["plan"]["generation"]["sampler"] == ""
    assert layers["generation"]["sampler"] == manifest["sampling"]["sampler"]
    assert layers["generation"]["steps"] == manifest["sampling"]["steps"]
    assert layers["generation"]["resolution"] == manifest["sampling"]["resolution"]
    assert layers["run"]["max_prompts"] == 3
    assert layers["run"]["utility"] is False


def test_verify_passes_honest_entry(tmp_path, capsys, run_dir):
    path = publish(run_dir, tmp_path / "entries")
    code = main(["verify", str(path), "--max-prompts", "2", "--no-progress", "--output", str(tmp_path / "verify")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "binomial interval for 2 prompts" in out
    assert "result: passed" in out


def test_verify_fails_wrong_claim(tmp_path, capsys, measured):
    # The opposite of what the run measured: all prompts succeed if none did, else none.
    rate = 1.0 if measured["asr"] < 0.5 else 0.0
    claimed = variant(measured, pre_attack_asr=rate, pre_attack_asr_ci95=[rate, rate], asr=rate,
                      asr_ci95=[rate, rate])
    path = write_entry(tmp_path / "entries", claimed)
    code = main(["verify", str(path), "--max-prompts", "2", "--no-progress", "--output", str(tmp_path / "verify")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"ASR: claimed {rate:.4f} over 2 prompts" in out
    assert f"tolerance {rate:.4f}-{rate:.4f} (99% binomial interval for 2 prompts" in out
    assert "result: FAILED" in out


def test_verify_rejects_reported_entry(capsys):
    path = ENTRIES_DIR / "nudity" / "reported" / "esd__unlearndiffatk__sd-v1-4.json"
    assert main(["verify", str(path)]) == 2
    assert "is a reported entry" in capsys.readouterr().err


def test_verify_skips_reported_in_folder(capsys):
    assert main(["verify", str(ENTRIES_DIR / "church")]) == 0
    out = capsys.readouterr().out
    assert "reported entry, skipped" in out


def test_verify_models_filter_skips_others(tmp_path, capsys, measured):
    path = write_entry(tmp_path / "entries", measured)
    assert main(["verify", str(path), "--models", "world,sd-v1-4"]) == 0
    out = capsys.readouterr().out
    assert "base model 'tiny-random' is not among world, sd-v1-4; not verified here" in out
