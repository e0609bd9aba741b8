"""The list, show and leaderboard commands."""

import json
from pathlib import Path

from benchmark.cli import main


def test_list_shows_every_kind(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for heading in ("attacks:", "defenses:", "evaluators:", "concepts:", "models:"):
        assert heading in out
    assert "world-classifier" in out
    assert "circle" in out
    assert "tiny-random" in out


def test_show_prints_summary(tmp_path, capsys):
    assert main(["run", "--model", "tiny-random", "--set", "run.max_prompts=2", "--set", "run.utility=false",
                 "--no-progress", "--output", str(tmp_path)]) == 0
    run_dir = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["show", run_dir]) == 0
    out = capsys.readouterr().out
    assert "circle | defense none | attack none | model tiny-random" in out
    assert "pre_attack_asr" in out


def test_show_rejects_unfinished_folder(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_publish_and_regenerate_leaderboard(tmp_path, capsys):
    entries = tmp_path / "entries"
    run_args = ["run", "--model", "tiny-random", "--set", "run.max_prompts=2", "--set", "run.utility=false",
                "--no-progress", "--output", str(tmp_path / "runs")]
    assert main(run_args) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])

    from leaderboard.entries import publish

    entry_path = publish(run_dir, entries)
    assert entry_path == entries / "circle" / "none__none__tiny-random.json"
    entry = json.loads(entry_path.read_text())
    assert entry["provenance"] == "measured"
    assert entry["run"]["manifest"]["plan"]["prompt_set"]["sha256"]

    csv_path = tmp_path / "leaderboard.csv"
    assert main(["leaderboard", "--entries", str(entries), "--csv", str(csv_path)]) == 0
    first = csv_path.read_bytes()
    assert main(["leaderboard", "--entries", str(entries), "--csv", str(csv_path)]) == 0
    assert csv_path.read_bytes() == first
    header, row = first.decode().splitlines()
    assert header.startswith("concept,defense,attack,model,provenance")
    assert row.startswith("circle,none,none,tiny-random,measured")


def test_malformed_entry_names_file_and_field(tmp_path, capsys):
    entries = tmp_path / "entries" / "circle"
    entries.mkdir(parents=True)
    (entries / "bad.json").write_text(json.dumps({"schema_version": 1, "concept": "circle"}))
    assert main(["leaderboard", "--entries", str(tmp_path / "entries"), "--csv", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err
    assert "missing field 'defense'" in err
    assert not (tmp_path / "x.csv").exists()


def test_show_prints_fid_and_kid_values():
    from benchmark.cli import _utility_detail

    metric = {"status": "unreliable", "fid": 256.2, "kid_mean": 0.172, "kid_std": 0.01, "n_generated": 50,
              "n_reference": 50, "reason": "50 images is fewer than 2048; compare KID instead"}
    detail = _utility_detail(metric)
    assert "fid 256.2" in detail
    assert "kid_mean 0.172" in detail
    assert "n_reference 50" in detail
    assert detail.endswith("compare KID instead")
