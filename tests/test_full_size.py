"""Full-size SD v1.4 architecture with random weights on the CPU (slow: several minutes, ~9 GB)."""

import json
from pathlib import Path

import pytest

from benchmark.cli import main

pytestmark = pytest.mark.slow


def test_one_prompt_end_to_end_on_sd14_architecture(tmp_path, capsys):
    prompts = tmp_path / "one.csv"
    prompts.write_text("case_number,prompt,evaluation_seed,evaluation_guidance\n0,a photo of a church,42,7.5\n")
    code = main([
        "run", "--model", "sd-v1-4-random", "--prompts", str(prompts), "--no-progress",
        "--set", "generation.steps=2", "--set", "generation.resolution=256", "--set", "run.utility=false",
        "--output", str(tmp_path / "runs"),
    ])
    assert code == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_prompts"] == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["sampling"] == {"sampler": "lms", "steps": 2, "resolution": 256}
    assert manifest["model"]["name"] == "sd-v1-4-random"
