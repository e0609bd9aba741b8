"""benchmarks/run_benchmarks.py in its smallest mode on the tiny random model.

The smoke mode runs every measurement once in this process. Its numbers mean nothing, so the
test checks the rows and the page, never a timing.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from benchmark.provenance import cpu_model

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run_benchmarks.py"
MEASURED_EVERYWHERE = {"attack", "defense", "generation", "batched-attack"}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("run_benchmarks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the class body runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def report(script, tmp_path_factory):
    output = tmp_path_factory.mktemp("benchmarks")
    code = script.main(["--smoke", "--model", "tiny-random", "--output-dir", str(output)])
    return code, output


def test_smoke_run_exits_cleanly(report):
    code, _ = report
    assert code == 0


def test_json_has_every_row(script, report):
    _, output = report
    rows = json.loads((output / "benchmarks.json").read_text())["rows"]
    names = {(row["kind"], row["name"]) for row in rows}

    expected = {("attack", name) for name in script.ATTACKS}
    expected |= {("defense", name) for name in script.DEFENSES}
    expected |= {("generation", name) for name in script.GENERATION_VARIANTS}
    expected |= {("evaluator", name) for name in script.EVALUATORS}
    expected |= {("batched-attack", name) for name in script.BATCHED_ATTACKS}
    expected |= {("run", "advunlearn x unlearndiffatk")}
    assert names == expected
    assert len(rows) == len(expected)


def test_method_and_generation_rows_are_measured(report):
    _, output = report
    rows = json.loads((output / "benchmarks.json").read_text())["rows"]
    for row in rows:
        if row["kind"] in MEASURED_EVERYWHERE:
            assert row["status"] == "measured", row
            assert row["model"] == "tiny-random"
            for key in ("seconds", "baseline_seconds", "ratio", "peak_rss_mib"):
                assert row[key] > 0, (row["name"], key)
            assert isinstance(row["passed"], bool)


def test_step_rows_count_unet_passes(report):
    _, output = report
    rows = json.loads((output / "benchmarks.json").read_text())["rows"]
    for row in rows:
        if row["kind"] in ("attack", "defense"):
            assert "fwd+bwd" in row["details"]["unet_passes_per_step"], row["name"]


def test_shipped_evaluators_are_measured(script, report):
    _, output = report
    rows = {row["name"]: row for row in json.loads((output / "benchmarks.json").read_text())["rows"]}
    assert rows["world-classifier"]["status"] == "measured"
    assert rows["nudenet"]["status"] == "measured"
    for name in ("clip-score", "fid", "style-classifier", "object-classifier"):
        assert rows[name]["status"] in ("measured", "skipped"), name
        if rows[name]["status"] == "skipped":
            assert rows[name]["reason"], name
    # Random-weight stand-ins are left out of smoke mode, which must stay fast.
    for name in script.RANDOM_WEIGHT_EVALUATORS:
        if rows[name]["status"] == "skipped":
            assert "quick and full modes only" in rows[name]["reason"], name


def test_batched_attack_row_compares_batch_sizes(report):
    _, output = report
    rows = json.loads((output / "benchmarks.json").read_text())["rows"]
    (row,) = [row for row in rows if row["kind"] == "batched-attack"]
    assert row["details"]["step_batch_sizes"] == {"batched": [8], "sequential": [1]}
    assert row["prompts_per_second"] > 0
    assert row["baseline_prompts_per_second"] > 0


def test_only_run_keeps_the_other_rows(script, report, tmp_path):
    _, output = report
    previous = json.loads((output / "benchmarks.json").read_text())
    (tmp_path / "benchmarks.json").write_text(json.dumps(previous))
    code = script.main(["--smoke", "--model", "tiny-random", "--output-dir", str(tmp_path),
                        "--only", "evaluator/world-classifier"])
    assert code == 0
    merged = json.loads((tmp_path / "benchmarks.json").read_text())
    assert [(row["kind"], row["name"]) for row in merged["rows"]] == \
        [(row["kind"], row["name"]) for row in previous["rows"]]
    assert merged["updates"][-1]["only"] == "evaluator/world-classifier"
    assert "measured again" in (tmp_path / "benchmarks.md").read_text()


def test_whole_run_skipped_outside_full_mode(report):
    _, output = report
    rows = json.loads((output / "benchmarks.json").read_text())["rows"]
    (run,) = [row for row in rows if row["kind"] == "run"]
    assert run["status"] == "skipped"
    assert run["reason"] == "measured in full mode only"


def test_page_lists_machine_and_table(report):
    _, output = report
    page = (output / "benchmarks.md").read_text()
    assert page.startswith("# Benchmarks")
    assert "one torch thread" in page
    assert ("| model | measurement | measured | baseline | ratio | ratio with text encoder | target | result "
            "| peak RSS |") in page
    assert "tiny-random" in page
    if cpu_model():
        assert f"{cpu_model()} with torch's {torch.backends.cpu.get_cpu_capability()} kernels" in page


def test_model_label_with_resolution(script):
    assert script.split_model_label("sd-v1-4-random@512") == ("sd-v1-4-random", 512)
    assert script.split_model_label("world") == ("world", None)


@pytest.mark.parametrize("label", ["world@512", "sd-v1-4-random@500", "sd-v1-4-random@big", "sd-v2"])
def test_invalid_model_label_is_rejected(script, label):
    with pytest.raises(SystemExit, match="--model"):
        script.split_model_label(label)


def test_reference_resolution_plans_attacks_and_esd_u(script):
    tasks = script.plan_tasks(("sd-v1-4-random@512",), "full", 128, set())
    planned = {(task["kind"], task["name"]) for task in tasks if task["model"] == "sd-v1-4-random@512"}
    assert planned == {("attack", name) for name in script.ATTACKS} | {("defense", "esd-u")}


# Pages rendered from small hand-made reports, without measuring.

SMOKE_NOTE = "only check that the script runs"
WORLD_SENTENCE = "So on the default world no attack step"
REFERENCE_SENTENCE = "The rows at 512 pixels"


def measured_step_row(kind: str, name: str, model: str) -> dict:
    return {
        "kind": kind, "name": name, "model": model, "status": "measured", "seconds": 0.03,
        "baseline_seconds": 0.02, "ratio": 1.5, "target": "<= 1.1", "passed": False, "peak_rss_mib": 900.0,
        "details": {"how": "attack() with max_train_steps 2 and 14", "unet_passes_per_step": "1 x fwd+bwd",
                    "text_encoder_passes_per_step": "none", "text_encoder_floor_seconds": 0.0,
                    "ratio_to_unet_and_text_encoder": 1.5, "notes": []},
    }


def render(script, tmp_path, mode: str, rows: list[dict], models: list[str] | None = None) -> str:
    report = {
        "date": "2026-01-01 00:00 UTC",
        "machine": {"platform": "Linux", "processor": "x86_64", "cpu_count": 2, "python": "3.11", "torch": "2"},
        "settings": {"mode": mode, "models": models or ["world"], "resolution": 128, "repeats": {}},
        "rows": rows,
        "failures": 0,
    }
    script.write_page(report, tmp_path)
    return (tmp_path / "benchmarks.md").read_text()


def test_smoke_page_has_smoke_note(script, tmp_path):
    page = render(script, tmp_path, "smoke", [measured_step_row("attack", "cce", "tiny-random")], ["tiny-random"])
    assert SMOKE_NOTE in page
    assert "one repeat on tiny-random, a tiny random-weight model" in page
    assert page.index(SMOKE_NOTE) < page.index("## Results")


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_measured_page_has_no_smoke_note(script, tmp_path, mode):
    page = render(script, tmp_path, mode, [measured_step_row("attack", "cce", "world")])
    assert SMOKE_NOTE not in page


def test_smoke_run_page_has_smoke_note(report):
    _, output = report
    page = (output / "benchmarks.md").read_text()
    assert SMOKE_NOTE in page
    assert WORLD_SENTENCE not in page
    assert REFERENCE_SENTENCE not in page


def test_world_sentences_need_world_attack_rows(script, tmp_path):
    with_world = render(script, tmp_path, "quick", [measured_step_row("attack", "cce", "world")])
    assert WORLD_SENTENCE in with_world
    assert "Beyond its UNet passes" in with_world
    without_world = render(script, tmp_path, "smoke", [measured_step_row("attack", "cce", "tiny-random")],
                           ["tiny-random"])
    assert WORLD_SENTENCE not in without_world
    assert "Beyond its UNet passes" in without_world


def test_reference_sentences_need_512_rows(script, tmp_path):
    rows = [measured_step_row("attack", "cce", "sd-v1-4-random"),
            measured_step_row("defense", "esd-u", "sd-v1-4-random")]
    page = render(script, tmp_path, "full", rows, ["sd-v1-4-random"])
    assert "On the full-size architecture the text encoder's share shrinks" in page
    assert REFERENCE_SENTENCE not in page
    assert "hardly at 512" not in page
    assert "That update costs the same at every resolution." in page

    rows.append(measured_step_row("defense", "esd-u", "sd-v1-4-random@512"))
    page = render(script, tmp_path, "full", rows, ["sd-v1-4-random"])
    assert REFERENCE_SENTENCE in page
    assert "it weighs on the step at 128 pixels and hardly at 512." in page


def test_attack_costs_need_step_rows(script, tmp_path):
    page = render(script, tmp_path, "quick", [])
    assert "Beyond its UNet passes" not in page
    assert "813 M" not in page
    assert "Every model uses the default world's method budgets" in page


def test_page_has_usage_section(script, tmp_path):
    page = render(script, tmp_path, "full", [])
    usage = page[page.index("## Running the benchmarks"):]
    for command in ("python benchmarks/run_benchmarks.py\n", "--quick", "--smoke", "--render-only",
                    "--model sd-v1-4-random@512 --only defense/esd-u --output-dir /tmp/bench"):
        assert command in usage, command
    assert "replaces the row of the same kind, name and model" in usage


@pytest.mark.parametrize("count, noun, plural, expected", [
    (1, "image", None, "1 image"), (8, "image", None, "8 images"),
    (1, "micro-batch", "micro-batches", "1 micro-batch"), (2, "micro-batch", "micro-batches", "2 micro-batches"),
])
def test_count_noun_singular_and_plural(script, count, noun, plural, expected):
    assert script.count_noun(count, noun, plural) == expected


def test_images_phrase(script):
    assert script.images_phrase(1, 512) == "1 image of 512 x 512 pixels"
    assert script.images_phrase(8, 32) == "8 images of 32 x 32 pixels"


def test_smoke_run_page_has_no_plural_brackets(report):
    _, output = report
    page = (output / "benchmarks.md").read_text()
    assert "(s)" not in page
    assert "(es)" not in page
    assert "512 x 512 images" not in page


def test_short_reason_cuts_at_word_boundary(script):
    reason = ("weights not available locally, and random-weight stand-ins are measured in quick and full "
              "modes only: no file")
    cell = script.short_reason(reason)
    assert len(cell) <= 80
    assert cell.endswith("measured in…")
    assert script.short_reason("short reason; more detail") == "short reason"


def test_skipped_reason_appears_in_full(script, tmp_path):
    reason = "weights not available locally, and random-weight stand-ins are measured in quick and full modes " \
             "only: evaluator.weights is empty"
    row = {"kind": "evaluator", "name": "clip-score", "model": None, "status": "skipped", "reason": reason,
           "passed": None, "details": {}}
    page = render(script, tmp_path, "smoke", [row], ["tiny-random"])
    table_row = next(line for line in page.splitlines() if line.startswith("| - | evaluator clip-score"))
    assert "measured in…" in table_row
    assert reason not in table_row
    assert f"- **evaluator clip-score** skipped: {reason}" in page
    assert "the notes below the table give it in full" in page


def test_other_mode_stops_before_measuring(script, report, tmp_path, capsys):
    _, output = report
    previous = json.loads((output / "benchmarks.json").read_text())
    previous["settings"]["mode"] = "full"
    (tmp_path / "benchmarks.json").write_text(json.dumps(previous))

    with pytest.raises(SystemExit, match="measured in mode 'full', this run in 'smoke'"):
        script.main(["--smoke", "--only", "defense/fmn", "--output-dir", str(tmp_path)])
    assert "measuring" not in capsys.readouterr().err
