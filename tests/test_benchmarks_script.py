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
