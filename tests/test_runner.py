"""End-to-end runs of the CLI on the tiny random model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmark.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny-random", "--set", "run.utility=false", "--no-progress"]


def run_cli(capsys, *arguments):
    code = main(["run", *TINY, *arguments])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def records_without_timings(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    for record in records:
        record["attack"].pop("seconds", None)
    return records


def test_full_run_writes_complete_folder(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "--set", "run.max_prompts=3", "--output", str(tmp_path))
    assert code == 0
    run_dir = Path(out[-1])
    assert run_dir.parent == tmp_path

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("pre_attack_asr", "asr", "n_prompts", "n_invalid"):
        assert isinstance(summary[key], (int, float)), key
    assert summary["n_prompts"] == 3
    assert summary["asr"] == summary["pre_attack_asr"]
    assert summary["utility"]["fid"]["status"] == "skipped"
    assert summary["utility"]["retain_accuracy"]["status"] == "skipped"

    records = records_without_timings(run_dir)
    assert [r["prompt_id"] for r in records] == ["0", "1", "2"]
    for record in records:
        assert (run_dir / record["pre"]["image"]).is_file()
        assert (run_dir / record["post"]["image"]).is_file()
        assert record["attack"]["reencoded_token_ids_match"]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["plan"]["prompt_set"]["sha256"]) == 64
    assert set(manifest["model"]["base_sha256"]) == {"text_encoder", "unet", "vae"}
    assert manifest["evaluator"]["weights_sha256"]
    assert manifest["environment"]["libraries"]["torch"]
    assert manifest["environment"]["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (run_dir / "grid.png").is_file()


def test_same_command_twice_gives_same_records(tmp_path, capsys):
    first = Path(run_cli(capsys, "--set", "run.max_prompts=3", "--output", str(tmp_path / "a"))[1][-1])
    second = Path(run_cli(capsys, "--set", "run.max_prompts=3", "--output", str(tmp_path / "b"))[1][-1])
    assert records_without_timings(first) == records_without_timings(second)
    for name in ("0_pre.png", "2_post.png"):
        assert (first / "images" / name).read_bytes() == (second / "images" / name).read_bytes()


def test_images_do_not_depend_on_batch_size(tmp_path, capsys):
    single = Path(run_cli(capsys, "--set", "run.max_prompts=4", "--set", "generation.batch_size=1",
                          "--output", str(tmp_path / "a"))[1][-1])
    batched = Path(run_cli(capsys, "--set", "run.max_prompts=4", "--set", "generation.batch_size=3",
                           "--output", str(tmp_path / "b"))[1][-1])
    assert single.name == batched.name
    assert records_without_timings(single) == records_without_timings(batched)
    for index in range(4):
        for side in ("pre", "post"):
            name = f"{index}_{side}.png"
            assert (single / "images" / name).read_bytes() == (batched / "images" / name).read_bytes(), name


def test_rerun_of_finished_run_adds_nothing(tmp_path, capsys):
    run_dir = Path(run_cli(capsys, "--set", "run.max_prompts=2", "--output", str(tmp_path))[1][-1])
    before = (run_dir / "records.jsonl").read_bytes()
    assert run_cli(capsys, "--set", "run.max_prompts=2", "--output", str(tmp_path))[0] == 0
    assert (run_dir / "records.jsonl").read_bytes() == before


def test_changed_config_needs_fresh(tmp_path, capsys):
    run_dir = Path(run_cli(capsys, "--set", "run.max_prompts=2", "--output", str(tmp_path))[1][-1])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["run_key"] = "something-else"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    code, _, err = run_cli(capsys, "--set", "run.max_prompts=2", "--output", str(tmp_path))
    assert code == 2
    assert "--fresh" in err
    code, out, _ = run_cli(capsys, "--set", "run.max_prompts=2", "--output", str(tmp_path), "--fresh")
    assert code == 0
    assert len(records_without_timings(Path(out[-1]))) == 2


def test_dry_run_resolves_without_computing(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "--dry-run", "--defense", "none", "--attack", "none", "--output", str(tmp_path))
    assert code == 0
    plan = json.loads("\n".join(out))
    assert plan["defense"]["name"] == "none"
    assert plan["prompt_set"]["n_prompts"] == 50
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arguments, fragment", [
    (["--defense", "esd-q"], "unknown defense 'esd-q'; available: "),
    (["--attack", "nope"], "unknown attack 'nope'"),
    (["--concept", "cirle"], "unknown concept 'cirle'"),
    (["--set", "attack.k=5"], "unknown key attack.k: attack 'none' takes no settings"),
    (["--attack", "unlearndiffatk", "--set", "attack.kk=5"], "unknown key attack.kk; valid keys of attack: "),
    (["--set", "run.max_prompts=-1"], "run.max_prompts: -1 is below the minimum 0"),
    (["--set", "generation.sampler=heun"], "valid: , ddim, lms"),
    (["--set", "nonsense.key=1"], "unknown config section 'nonsense'"),
    (["--set", "defense/esdx.iterations=3"], "no defense is named 'esdx'"),
    (["--set", "attack/unlearndifatk.timesteps=2"], "did you mean attack/unlearndiffatk?"),
    (["--defense", ""], "--defense is empty"),
    (["--attack", ","], "--attack is empty"),
    (["--defense", "none,none"], "--defense lists none twice"),
    (["--defense", "esd,esd-u"], "lists esd-u twice (after expanding esd = esd-x,esd-u)"),
])
def test_bad_arguments_are_named(tmp_path, capsys, arguments, fragment):
    code, _, err = run_cli(capsys, *arguments, "--output", str(tmp_path))
    assert code == 2
    assert fragment in err


def json_objects(text: str) -> list[dict]:
    """Parse the JSON objects that --dry-run prints one after another, one per cell."""
    decoder, objects, position = json.JSONDecoder(), [], 0
    while position < len(text):
        value, end = decoder.raw_decode(text, position)
        objects.append(value)
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
    return objects


def test_family_section_sets_each_member(tmp_path, capsys):
    code, out, err = run_cli(capsys, "--dry-run", "--defense", "esd", "--set", "defense/esd.iterations=7",
                             "--set", "defense/esd-u.iterations=9", "--output", str(tmp_path))
    assert code == 0, err
    plans = json_objects("\n".join(out))
    iterations = {plan["defense"]["name"]: plan["defense"]["config"]["iterations"] for plan in plans}
    assert iterations == {"esd-x": 7, "esd-u": 9}


def test_checkpoint_interval_keeps_run_key(tmp_path, capsys):
    plans = []
    for every in ("200", "20"):
        code, out, err = run_cli(capsys, "--dry-run", "--defense", "esd-x", "--set", f"defense.checkpoint_every={every}",
                                 "--output", str(tmp_path))
        assert code == 0, err
        plans.append(json.loads("\n".join(out)))

    assert plans[0]["run_folder"] == plans[1]["run_folder"]
    assert plans[1]["defense"]["config"]["checkpoint_every"] == 20


def test_malformed_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    prompts.write_text("case_number,text\n0,a circle\n")
    code, _, err = run_cli(capsys, "--prompts", str(prompts), "--output", str(tmp_path / "runs"))
    assert code == 2
    assert "no 'prompt' column" in err

    prompts.write_text("prompt\n")
    code, _, err = run_cli(capsys, "--prompts", str(prompts), "--output", str(tmp_path / "runs"))
    assert code == 2
    assert "no prompts" in err


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "--set", "run.max_prompts=1", "--output", str(blocker / "runs"))
    assert code == 2
    assert "cannot write the run folder" in err


def test_truncated_prompt_is_recorded(tmp_path, capsys):
    prompts = tmp_path / "long.csv"
    long_prompt = " ".join(["a red circle"] * 40)
    prompts.write_text(f"case_number,prompt,evaluation_seed\n0,{long_prompt},1\n1,a circle,2\n")
    code, out, _ = run_cli(capsys, "--prompts", str(prompts), "--output", str(tmp_path / "runs"))
    assert code == 0
    records = records_without_timings(Path(out[-1]))
    assert records[0]["prompt_truncated"] is True
    assert records[0]["prompt_tokens"] == 122
    assert records[1]["prompt_truncated"] is False
    summary = json.loads((Path(out[-1]) / "summary.json").read_text())
    assert summary["n_truncated_prompts"] == 1


def test_resume_after_kill(tmp_path):
    """Kill a real run with SIGKILL mid-way, rerun it, and compare with an uninterrupted run."""
    arguments = [sys.executable, "-m", "benchmark", "run", *TINY, "--set", "run.max_prompts=6",
                 "--set", "generation.batch_size=1", "--set", "run.threads=1"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}

    reference = subprocess.run([*arguments, "--output", str(tmp_path / "reference")], cwd=REPO, env=environment,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    reference_dir = Path(reference.stdout.strip().splitlines()[-1])

    output = tmp_path / "killed"
    process = subprocess.Popen([*arguments, "--output", str(output)], cwd=REPO, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records_file = output / reference_dir.name / "records.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if records_file.exists() and len(records_file.read_bytes().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = len(records_file.read_bytes().splitlines())
    assert 2 <= killed_at < 6, "the run should be killed mid-way"

    resumed = subprocess.run([*arguments, "--output", str(output)], cwd=REPO, env=environment,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert records_without_timings(output / reference_dir.name) == records_without_timings(reference_dir)


def test_no_progress_hides_weight_loading_bars(tmp_path, capsys):
    from benchmark.progress import library_progress_bars

    arguments = ["run", "--set", "run.max_prompts=1", "--set", "run.utility=false", "--output", str(tmp_path)]
    try:
        assert main([*arguments, "--no-progress"]) == 0
        assert "Loading weights" not in capsys.readouterr().err
    finally:
        library_progress_bars(True)

    assert main([*arguments, "--fresh"]) == 0
    assert "Loading weights" in capsys.readouterr().err


def test_interrupt_says_how_to_resume(tmp_path):
    # Progress bars stay on, so that the message has to come after them. The 50 prompts take several
    # seconds, so the interrupt lands while prompts are still running.
    arguments = [sys.executable, "-m", "benchmark", "run", "--model", "tiny-random", "--set", "run.utility=false",
                 "--set", "run.max_prompts=50",
                 "--set", "generation.batch_size=1", "--set", "run.threads=1", "--output", str(tmp_path)]
    process = subprocess.Popen(arguments, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("*/records.jsonl")):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)

    assert process.returncode == 130, err
    assert "run the same command again to resume" in err.strip().splitlines()[-1]
    assert "Traceback" not in err


def test_torn_last_line_is_repaired(tmp_path, capsys):
    run_dir = Path(run_cli(capsys, "--set", "run.max_prompts=3", "--output", str(tmp_path))[1][-1])
    complete = records_without_timings(run_dir)
    lines = (run_dir / "records.jsonl").read_bytes().splitlines(keepends=True)
    (run_dir / "records.jsonl").write_bytes(b"".join(lines[:2]) + lines[2][:25])

    assert run_cli(capsys, "--set", "run.max_prompts=3", "--output", str(tmp_path))[0] == 0
    assert records_without_timings(run_dir) == complete


def test_utility_metrics_report_status(tmp_path, capsys):
    code = main(["run", "--model", "tiny-random", "--no-progress", "--set", "run.max_prompts=1",
                 "--output", str(tmp_path)])
    assert code == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    utility = json.loads((run_dir / "summary.json").read_text())["utility"]

    retain = utility["retain_accuracy"]
    assert retain["status"] == "measured"
    assert 0.0 <= retain["accuracy"] <= 1.0
    assert retain["n_prompts"] == 50
    for name in ("fid", "clip-score"):
        assert utility[name]["status"] in ("measured", "unreliable", "unavailable")
        if utility[name]["status"] == "unavailable":
            assert utility[name]["reason"]


def test_dry_run_checks_model_exists(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("SD14_PATH", raising=False)
    code = main(["run", "--dry-run", "--model", "sd-v1-4", "--output", str(tmp_path)])
    assert code == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err


def test_set_beats_model_budget(tmp_path):
    from benchmark.runner import RunRequest, resolve

    budgeted = resolve(RunRequest(defense="esd-x"))
    assert budgeted.defense_config.iterations == 300
    overridden = resolve(RunRequest(defense="esd-x", sets=["defense.iterations=7"]))
    assert overridden.defense_config.iterations == 7
