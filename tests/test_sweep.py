"""The sweep command: planning, shard slices, the local and Ray executors, and resuming after a kill.

The sweeps run on the embedded default world with 4 prompts per cell and a 2-iteration ESD-x,
so that each executor's sweep takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.paths import CACHE_VARIABLE

REPO = Path(__file__).resolve().parent.parent
BUDGET = ["--set", "run.max_prompts=4", "--set", "run.utility=false", "--set", "generation.steps=3",
          "--set", "defense/esd-x.iterations=2", "--set", "defense/esd-x.ddim_steps=2"]
WORLD = ["--defenses", "none,esd-x", "--attacks", "none", *BUDGET, "--no-progress"]
CELLS = ("circle__none__none__world", "circle__esd-x__none__world")
# One cell, one record per append: a kill can land between two records of a shard. The batch
# size changes neither the run key nor any record, so the cell matches the WORLD sweep's.
KILLED = ["--defenses", "none", "--attacks", "none", *BUDGET, "--set", "generation.batch_size=1", "--no-progress",
          "--prompts-per-shard", "4"]


def sweep(capsys, *arguments) -> tuple[int, list[str], str]:
    code = main(["sweep", *arguments])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def plan(capsys, *arguments) -> list[dict]:
    code, out, err = sweep(capsys, "--dry-run", *arguments)
    assert code == 0, err
    return json.loads("\n".join(out))


def records_without_timings(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    for record in records:
        record["attack"].pop("seconds", None)
    return records


def cell_dirs(output: Path) -> dict[str, Path]:
    """Map each cell's folder name without its run-key suffix to the folder."""
    return {path.name.rsplit("__", 1)[0]: path for path in sorted(output.iterdir()) if not path.name.startswith(".")}


def assert_same_cells(output: Path, reference: Path, names=CELLS) -> None:
    found, expected = cell_dirs(output), cell_dirs(reference)
    assert sorted(found) == sorted(names)
    for name, run_dir in found.items():
        assert run_dir.name == expected[name].name
        assert records_without_timings(run_dir) == records_without_timings(expected[name]), name
        assert (run_dir / "summary.json").is_file(), name
        assert not (run_dir / "shards").exists(), name


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> Path:
    """The reference: the WORLD sweep with the local executor."""
    output = tmp_path_factory.mktemp("local")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_VARIABLE, str(tmp_path_factory.getbasetemp() / "cache"))
        code = main(["sweep", *WORLD, "--prompts-per-shard", "2", "--output", str(output)])
    assert code == 0
    return output


# ----------------------------------------------------------------------------------------
# Planning


def test_dry_run_orders_erasures_before_shards(tmp_path, capsys):
    units = plan(capsys, "--defenses", "esd-x,advunlearn", "--attacks", "none,unlearndiffatk,p4d-n",
                 "--set", "run.max_prompts=5", "--prompts-per-shard", "2", "--output", str(tmp_path))
    kinds = [unit["kind"] for unit in units]
    assert kinds == ["erasure"] * 2 + ["prompts"] * 18 + ["merge"] * 6

    position = {unit["id"]: index for index, unit in enumerate(units)}
    for unit in units:
        for dependency in unit["depends_on"]:
            assert position[dependency] < position[unit["id"]], (dependency, unit["id"])

    erasures = [unit for unit in units if unit["kind"] == "erasure"]
    for erasure in erasures:
        dependents = [unit for unit in units if erasure["id"] in unit["depends_on"]]
        assert len(dependents) == 3 * 3, "one erasure serves the 3 prompt shards of each of 3 attacks"
    shards = [unit for unit in units if unit["kind"] == "prompts"]
    assert [shard["prompt_ids"] for shard in shards[:3]] == [["0", "1"], ["2", "3"], ["4"]]
    assert not any(tmp_path.iterdir())


def test_dry_run_expands_families(tmp_path, capsys):
    units = plan(capsys, "--defenses", "esd,advunlearn", "--attacks", "none,p4d", "--set", "run.max_prompts=1",
                 "--output", str(tmp_path))
    cells = {(unit["request"]["defense"], unit["request"]["attack"]) for unit in units if unit["kind"] == "merge"}
    assert cells == {(defense, attack) for defense in ("esd-x", "esd-u", "advunlearn")
                     for attack in ("none", "p4d-n", "p4d-k")}


def test_dry_run_logs_reduced_budgets(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    plan(capsys, "--defenses", "esd-x", "--attacks", "none,unlearndiffatk", "--output", str(tmp_path))
    assert "model world sets reduced budgets for defense/esd-x, attack/unlearndiffatk" in caplog.text


def test_checkpoint_interval_shares_erasure(tmp_path, capsys):
    erasures = []
    for every in ("200", "20"):
        units = plan(capsys, "--defenses", "esd-x", "--set", f"defense.checkpoint_every={every}",
                     "--output", str(tmp_path))
        erasures.append([unit["erasure"] for unit in units if unit["kind"] == "erasure"])

    assert erasures[0] == erasures[1]


def test_dry_run_folders_match_run(tmp_path, capsys):
    units = plan(capsys, *WORLD, "--output", str(tmp_path))
    assert main(["run", "--dry-run", "--defense", "esd-x", *BUDGET, "--output", str(tmp_path)]) == 0
    run_plan = json.loads(capsys.readouterr().out)
    assert run_plan["run_folder"] in {unit["run_folder"] for unit in units}


def test_no_defense_needs_no_erasure(tmp_path, capsys):
    units = plan(capsys, "--defenses", "none", "--attacks", "none", *BUDGET, "--output", str(tmp_path))
    assert [unit["kind"] for unit in units] == ["prompts"] * 1 + ["merge"]
    assert units[0]["depends_on"] == []


def test_cce_shards_wait_for_first_shard(tmp_path, capsys):
    units = plan(capsys, "--defenses", "none", "--attacks", "cce", "--set", "run.max_prompts=5",
                 "--prompts-per-shard", "2", "--output", str(tmp_path))
    shards = [unit for unit in units if unit["kind"] == "prompts"]
    assert shards[0]["depends_on"] == []
    for shard in shards[1:]:
        assert shard["depends_on"] == [shards[0]["id"]]


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shard_slices_partition_units(tmp_path, capsys, count):
    arguments = ["--defenses", "none,esd-x,esd-u", "--attacks", "none,p4d-n", "--set", "run.max_prompts=6",
                 "--prompts-per-shard", "2", "--output", str(tmp_path)]
    units = plan(capsys, *arguments)
    compute = {unit["id"] for unit in units if unit["kind"] != "merge"}

    slices = [[unit["id"] for unit in plan(capsys, *arguments, "--shard", f"{index}/{count}")]
              for index in range(count)]
    covered = [unit_id for ids in slices for unit_id in ids]
    assert len(covered) == len(set(covered)), "slices overlap"
    assert set(covered) == compute
    for ids in slices:
        assert ids == [unit["id"] for unit in units if unit["id"] in ids], "a slice keeps plan order"


@pytest.mark.parametrize("arguments, fragment", [
    (["--defenses", "esd-q"], "unknown defense 'esd-q'; available: "),
    (["--attacks", "none,nope"], "unknown attack 'nope'"),
    (["--shard", "5/4"], "invalid --shard '5/4'"),
    (["--shard", "1-4"], "invalid --shard '1-4': expected i/n"),
    (["--shard", "0/0"], "invalid --shard '0/0'"),
    (["--prompts-per-shard", "0"], "invalid --prompts-per-shard 0"),
    (["--ray-num-cpus", "2"], "apply only to --executor ray"),
    (["--defenses", "none,none"], "twice"),
    (["--defenses", "esd,esd-u"], "--defenses lists esd-u twice (after expanding esd = esd-x,esd-u)"),
    (["--defenses", ","], "--defenses is empty"),
    (["--attacks", ""], "--attacks is empty"),
    (["--set", "defense.iterations=2", "--defenses", "none"], "unknown key defense.iterations: defense 'none' takes no settings"),
])
def test_bad_input_is_named(tmp_path, capsys, arguments, fragment):
    code, _, err = sweep(capsys, "--dry-run", *arguments, "--output", str(tmp_path))
    assert code == 2
    assert fragment in err


def test_missing_ray_names_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = sweep(capsys, "--executor", "ray", "--output", str(tmp_path))
    assert code == 2
    assert "pip install -e '.[ray]'" in err


def test_ray_rejects_numbered_gpu():
    from benchmark.sweep.executors import ray_resources
    from benchmark.sweep.plan import SweepError, WorkUnit

    unit = WorkUnit(id="u", kind="prompts", request={}, working_dir=".", run_folder=".", run_key="k",
                    device="cuda", threads=1)
    assert ray_resources(unit) == {"num_gpus": 1, "num_cpus": 1}
    assert ray_resources(WorkUnit(**{**unit.__dict__, "device": "cpu", "threads": 2})) == {"num_cpus": 2}
    with pytest.raises(SweepError, match="use --set run.device=cuda"):
        ray_resources(WorkUnit(**{**unit.__dict__, "device": "cuda:1"}))


# ----------------------------------------------------------------------------------------
# Local executor


def test_local_sweep_matches_run(local_sweep, tmp_path, capsys):
    assert main(["run", "--defense", "esd-x", *BUDGET, "--no-progress", "--output", str(tmp_path)]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    swept = cell_dirs(local_sweep)["circle__esd-x__none__world"]

    assert swept.name == run_dir.name
    assert records_without_timings(swept) == records_without_timings(run_dir)
    files = sorted(str(path.relative_to(swept)) for path in swept.rglob("*") if path.is_file())
    assert files == sorted(str(path.relative_to(run_dir)) for path in run_dir.rglob("*") if path.is_file())
    for name in ("images/0_pre.png", "images/3_post.png", "artifacts/2.json", "grid.png"):
        assert (swept / name).read_bytes() == (run_dir / name).read_bytes(), name

    summary, expected = (json.loads((folder / "summary.json").read_text()) for folder in (swept, run_dir))
    for key in ("pre_attack_asr", "asr", "asr_ci95", "n_prompts", "n_invalid", "run_key"):
        assert summary[key] == expected[key], key


def test_finished_sweep_rerun_adds_nothing(local_sweep, capsys, caplog):
    caplog.set_level(logging.INFO)
    before = {name: (folder / "records.jsonl").read_bytes() for name, folder in cell_dirs(local_sweep).items()}
    code, out, err = sweep(capsys, *WORLD, "--prompts-per-shard", "2", "--output", str(local_sweep))
    assert code == 0, err
    assert len(out) == len(CELLS)
    assert " done in " in caplog.text
    assert " computed " not in caplog.text
    after = {name: (folder / "records.jsonl").read_bytes() for name, folder in cell_dirs(local_sweep).items()}
    assert after == before


def test_shards_then_final_sweep_merges(local_sweep, tmp_path, capsys, caplog):
    from benchmark.sweep.plan import SweepError, WorkUnit
    from benchmark.sweep.units import execute_unit

    arguments = [*WORLD, "--prompts-per-shard", "2", "--output", str(tmp_path)]
    caplog.set_level(logging.INFO)
    code, _, err = sweep(capsys, *arguments, "--shard", "0/2")
    assert code == 0, err
    assert "without --shard" in caplog.text
    for run_dir in cell_dirs(tmp_path).values():
        assert not (run_dir / "summary.json").exists()
        assert (run_dir / "shards").is_dir()

    merge = WorkUnit.from_dict(next(unit for unit in plan(capsys, *arguments) if unit["kind"] == "merge"))
    with pytest.raises(SweepError, match="prompts have no record yet"):
        execute_unit(merge, show_progress=False)

    assert sweep(capsys, *arguments, "--shard", "1/2")[0] == 0
    code, out, err = sweep(capsys, *arguments)
    assert code == 0, err
    assert len(out) == len(CELLS)
    assert_same_cells(tmp_path, local_sweep)


def test_killed_sweep_resumes(local_sweep, tmp_path, capsys, caplog):
    """SIGKILL a local sweep mid-shard, rerun it, and compare with an uninterrupted sweep."""
    arguments = [*KILLED, "--output", str(tmp_path)]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "benchmark", "sweep", *arguments], cwd=REPO, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_at = 0
    while time.time() < deadline and not killed_at:
        for records in tmp_path.glob("*/shards/*/records.jsonl"):
            killed_at = len(records.read_bytes().splitlines())
            if killed_at:
                break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 1 <= killed_at < 4, "the sweep should be killed in the middle of a 4-prompt shard"

    caplog.set_level(logging.INFO)
    code, _, err = sweep(capsys, *arguments)
    assert code == 0, err
    assert "prompts already done" in caplog.text
    assert_same_cells(tmp_path, local_sweep, CELLS[:1])


# ----------------------------------------------------------------------------------------
# Ray executor


def test_ray_sweep_matches_local(local_sweep, tmp_path, capsys):
    pytest.importorskip("ray")
    code, out, err = sweep(capsys, *WORLD, "--prompts-per-shard", "2", "--executor", "ray", "--ray-num-cpus", "2",
                           "--output", str(tmp_path))
    assert code == 0, err
    assert len(out) == len(CELLS)
    assert_same_cells(tmp_path, local_sweep)


def _ray_worker_pid(title: str) -> int | None:
    """Return the pid of the process whose title (as Ray sets it) starts with ``title``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if command.startswith(title):
            return int(entry.name)
    return None


def _kill_worker_mid_shard(output: Path, stop: threading.Event, killed: list) -> None:
    """SIGKILL the Ray worker of the first prompt shard seen with 1 to 3 of its 4 records."""
    pid, records = None, None
    while not stop.is_set():
        if pid is None:
            for folder in output.glob("*/shards/00000-00004"):
                pid = _ray_worker_pid(f"ray::prompts/{folder.parents[1].name}/0-4")
                records = folder / "records.jsonl"
        elif records.exists():
            lines = len(records.read_bytes().splitlines())
            if 1 <= lines < 4:
                os.kill(pid, signal.SIGKILL)
                killed.append((records, lines))
                return
        time.sleep(0.005)


@pytest.mark.slow
def test_ray_worker_killed_mid_shard_is_retried(local_sweep, tmp_path, capsys):
    pytest.importorskip("ray")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_worker_mid_shard, args=(tmp_path, stop, killed), daemon=True)
    killer.start()
    try:
        code, _, err = sweep(capsys, *KILLED, "--executor", "ray", "--ray-num-cpus", "2", "--output", str(tmp_path))
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray worker was killed in the middle of a shard"
    assert code == 0, err
    assert_same_cells(tmp_path, local_sweep, CELLS[:1])
