"""Execution of one work unit, and how concurrent prompt shards share a cell's run folder.

A run folder (``benchmark/results.py``) is locked by one process at a time, so the prompt
shards of a cell do not append to the cell's ``records.jsonl`` directly. Each prompt shard
is a run folder of its own, ``<cell>/shards/<start>-<stop>/``, with its own lock and the
cell's run key. It writes records, images and attack artifacts exactly as ``run`` does. Each
record is one fsync'ed append after its images are on disk. Image and artifact paths in the
records are relative to the folder, so they read the same in the shard and in the cell.

The merge unit takes the cell's lock and the lock of every shard folder, moves the shards'
images and artifacts into the cell folder, and appends the records the cell lacks in prompt
order. It then runs ``Runner.run`` on the cell, which finds every prompt done and writes the
manifest, the summary (utility included) and the grid. Last, the merge deletes ``shards/``.
The cell folder then contains what ``python -m benchmark run`` of that cell writes.

Every step can be killed and repeated:

- A prompt shard skips prompts recorded in the cell or in any shard folder of the cell.
  Reopening its folder cuts a torn last line, as a resumed ``run`` does.
- The merge appends only prompts missing from the cell's records and moves files with
  ``os.replace``, so a repeated merge neither duplicates nor loses a record.
- The erased weights of an erasure identity are trained under a file lock in
  ``<output>/.sweep/erasures/``. Of several concurrent units, such as the tasks of a Slurm
  array, one trains them, and the others wait and then load them from the erasure cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from benchmark.paths import exclusive_lock
from benchmark.results import RECORDS, SUMMARY, RunFolder, read_records, write_json_atomic
from benchmark.runner import ResolvedRun, Runner, resolve
from benchmark.sweep.plan import ERASURE, MERGE, PROMPTS, SweepError, WorkUnit, erasure_digest, erasure_identity

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
STATE_DIR = ".sweep"
MOVED_SUBFOLDERS = ("images", "artifacts")


# ----------------------------------------------------------------------------------------
# Erasure lock


def erasure_state_dir(output: Path) -> Path:
    return Path(output) / STATE_DIR / "erasures"


def erasure_lock(state_dir: Path, digest: str):
    """Hold an exclusive file lock for one erasure identity, waiting while another process holds it."""
    return exclusive_lock(state_dir / f"{digest}.lock", f"erasure {digest}")


class SweepRunner(Runner):
    """A ``Runner`` whose erasure step holds the erasure lock of its cell."""

    def __init__(self, resolved: ResolvedRun, digest: str | None) -> None:
        super().__init__(resolved)
        self.digest = digest

    def _erase(self) -> None:
        if self.digest is None:
            super()._erase()
            return
        with erasure_lock(erasure_state_dir(self.request.output), self.digest):
            super()._erase()


# ----------------------------------------------------------------------------------------
# Units


def execute_unit(unit: WorkUnit, show_progress: bool = True) -> dict:
    """Run one work unit in its working directory, and return its id, status and wall seconds.

    The status is ``computed`` when the unit did work, and ``done`` when its results were
    already on disk.
    """
    started = time.perf_counter()
    previous = os.getcwd()
    os.chdir(unit.working_dir)
    try:
        resolved = _resolve_unit(unit, show_progress)
        runners = {ERASURE: run_erasure, PROMPTS: run_prompt_shard, MERGE: run_merge}
        status = runners[unit.kind](unit, resolved)
    finally:
        os.chdir(previous)
    return {"id": unit.id, "status": status, "seconds": round(time.perf_counter() - started, 3)}


def _resolve_unit(unit: WorkUnit, show_progress: bool) -> ResolvedRun:
    resolved = resolve(unit.run_request(show_progress))
    if resolved.run_key() != unit.run_key:
        raise SweepError(
            f"{unit.id}: the cell resolves to run key {resolved.run_key()}, but the sweep was planned with "
            f"{unit.run_key}; a config file, prompt file or plug-in changed after planning. Plan the sweep again "
            "and run every shard with the same files"
        )
    return resolved


def _cell_dir(resolved: ResolvedRun) -> Path:
    return Path(resolved.request.output) / resolved.folder_name()


def run_erasure(unit: WorkUnit, resolved: ResolvedRun) -> str:
    """Train (or find in the erasure cache) the erased weights of ``unit``'s erasure identity."""
    state_dir = erasure_state_dir(resolved.request.output)
    marker = state_dir / f"{unit.erasure}.json"
    if _erasure_finished(marker):
        return "done"

    runner = SweepRunner(resolved, unit.erasure)
    runner._load()
    runner._erase()
    write_json_atomic(marker, {"unit": unit.id, "identity": erasure_identity(resolved),
                               "erased_weights_cache": runner.erasure_cache})
    return "computed"


def _erasure_finished(marker: Path) -> bool:
    """Check that an earlier erasure unit left its marker and that the cached weights it names exist."""
    if not marker.exists():
        return False
    cache = json.loads(marker.read_text())["erased_weights_cache"]
    return cache is None or (Path(cache) / "erasure.json").exists()


def recorded_prompt_ids(cell: Path) -> set[str]:
    """Return the prompt ids recorded in the cell folder or in any of its shard folders.

    Files are read without their locks: a record line is complete once it ends with a newline,
    and a torn last line is ignored here (its writer cuts it when it reopens the folder).
    """
    done = {record["prompt_id"] for record in read_records(cell / RECORDS)}
    for shard in _shard_dirs(cell):
        done.update(record["prompt_id"] for record in read_records(shard / RECORDS))
    return done


def _shard_dirs(cell: Path) -> list[Path]:
    root = cell / SHARDS_DIR
    return sorted(path for path in root.iterdir() if path.is_dir()) if root.is_dir() else []


def run_prompt_shard(unit: WorkUnit, resolved: ResolvedRun) -> str:
    """Run the prompts of ``unit`` that no folder of the cell records yet, into the unit's shard folder."""
    cell = _cell_dir(resolved)
    records = resolved.records[unit.start : unit.stop]
    cell_done = {record["prompt_id"] for record in read_records(cell / RECORDS)}
    if all(record.id in cell_done for record in records):
        return "done"

    shard_dir = cell / SHARDS_DIR / unit.shard_name
    with RunFolder(shard_dir, resolved.run_key()) as folder:
        done = recorded_prompt_ids(cell)
        pending = [record for record in records if record.id not in done]
        if not pending and (shard_dir / SUMMARY).exists():
            return "done"

        runner = SweepRunner(resolved, erasure_digest(resolved))
        runner.folder = folder
        if pending:
            if len(pending) < len(records):
                logger.info("resuming %s: %d of %d prompts already done", unit.id, len(records) - len(pending),
                            len(records))
            runner._load()
            runner._erase()
            folder.write_manifest(runner.manifest())
            _run_records(runner, folder, pending)
        folder.write_summary({"unit": unit.id, "prompt_ids": [record.id for record in records],
                              "seconds": {stage: round(value, 3) for stage, value in runner.timer.seconds.items()}})
    return "computed" if pending else "done"


def _run_records(runner: Runner, folder: RunFolder, records: list) -> None:
    """Run ``records`` in batches of ``generation.batch_size``, as ``Runner.run`` does."""
    resolved = runner.resolved
    attack = resolved.attack_class(resolved.attack_config)
    batch = resolved.generation_config.batch_size
    progress = tqdm(total=len(records), desc="prompts", disable=not runner.request.show_progress, unit="prompt")
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        runner._run_chunk(attack, chunk, folder)
        progress.update(len(chunk))
    progress.close()


def run_merge(unit: WorkUnit, resolved: ResolvedRun) -> str:
    """Assemble the cell folder from its shard folders and write its manifest, summary and grid."""
    cell = _cell_dir(resolved)
    if _merge_finished(cell, resolved):
        return "done"
    shard_seconds = _append_shard_records(cell, resolved)

    runner = SweepRunner(resolved, erasure_digest(resolved))
    runner.timer.seconds = shard_seconds
    runner.run()
    shutil.rmtree(cell / SHARDS_DIR, ignore_errors=True)
    return "computed"


def _merge_finished(cell: Path, resolved: ResolvedRun) -> bool:
    """Check that the cell has its summary and every record, and no shard folder is left to merge."""
    if not (cell / SUMMARY).exists() or (cell / SHARDS_DIR).exists():
        return False
    done = {record["prompt_id"] for record in read_records(cell / RECORDS)}
    return all(record.id in done for record in resolved.records)


def _append_shard_records(cell: Path, resolved: ResolvedRun) -> dict[str, float]:
    """Move the shards' files into the cell and append its missing records in prompt order.

    Returns the seconds per stage that the shards spent, summed.
    """
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(RunFolder(cell, resolved.run_key()))
        shards = [stack.enter_context(RunFolder(path, resolved.run_key())) for path in _shard_dirs(cell)]

        done = {record["prompt_id"] for record in folder.records()}
        gathered: dict[str, dict] = {}
        for shard in shards:
            for record in shard.records():
                gathered.setdefault(record["prompt_id"], record)
        missing = [record.id for record in resolved.records if record.id not in done and record.id not in gathered]
        if missing:
            raise SweepError(
                f"cannot merge {cell}: {len(missing)} prompts have no record yet (first: {missing[:5]}); run the "
                "sweep again without --shard to compute them"
            )

        for shard in shards:
            _move_files(shard.path, cell)
        for record in resolved.records:
            if record.id not in done:
                folder.append(gathered[record.id])
        return _summed_seconds(shard.path for shard in shards)


def _move_files(shard: Path, cell: Path) -> None:
    for name in MOVED_SUBFOLDERS:
        source = shard / name
        if not source.is_dir():
            continue
        target = cell / name
        target.mkdir(exist_ok=True)
        for path in sorted(source.iterdir()):
            # A ".tmp" file is an unfinished atomic write of a prompt whose record was never written.
            if path.is_file() and not path.name.endswith(".tmp"):
                os.replace(path, target / path.name)


def _summed_seconds(shards) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for shard in shards:
        summary = shard / SUMMARY
        if summary.exists():
            for stage, value in json.loads(summary.read_text()).get("seconds", {}).items():
                seconds[stage] = seconds.get(stage, 0.0) + value
    return seconds
