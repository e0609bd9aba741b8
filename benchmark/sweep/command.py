"""The ``python -m benchmark sweep`` command: plan, select a slice, execute and report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from benchmark.sweep.executors import UnitOutcome, make_executor
from benchmark.sweep.plan import ERASURE, MERGE, PROMPTS, SweepSpec, WorkUnit, cell_folders, parse_shard, plan_sweep, select_shard

logger = logging.getLogger("benchmark")


def _names(value: str | None) -> tuple:
    if value is None:
        return (None,)
    return tuple(part.strip() for part in value.split(",") if part.strip()) or (None,)


def spec_from_args(args) -> SweepSpec:
    from benchmark.registry import ATTACKS, DEFENSES

    return SweepSpec(
        defenses=DEFENSES.parse_list(args.defenses, "--defenses"),
        attacks=ATTACKS.parse_list(args.attacks, "--attacks"),
        concepts=_names(args.concepts),
        models=_names(args.model), model_config=args.model_config, prompts=args.prompts,
        config_file=args.config_file, sets=tuple(args.sets), output=str(args.output),
        prompts_per_shard=args.prompts_per_shard,
    )


def run_sweep_command(args) -> int:
    """Run ``sweep``: 0 when every selected unit finished, 1 when any failed or was skipped."""
    shard = parse_shard(args.shard) if args.shard is not None else None
    executor = make_executor(args.executor, args.ray_address, args.ray_num_cpus, show_progress=not args.no_progress)
    units = plan_sweep(spec_from_args(args))
    selected = select_shard(units, *shard) if shard else units

    if args.dry_run:
        print(json.dumps([unit.to_dict() for unit in selected], indent=2, sort_keys=True))
        return 0

    counts = {kind: sum(1 for unit in selected if unit.kind == kind) for kind in (ERASURE, PROMPTS, MERGE)}
    logger.info("sweep of %d cells: %d erasure, %d prompt and %d merge units%s on the %s executor",
                len(cell_folders(units)), counts[ERASURE], counts[PROMPTS], counts[MERGE],
                f" (shard {args.shard} of the plan)" if shard else "", executor.name)
    outcomes = executor.run(selected)
    return _report(selected, outcomes, sharded=shard is not None)


def _report(units: list[WorkUnit], outcomes: list[UnitOutcome], sharded: bool) -> int:
    unfinished = [outcome for outcome in outcomes if outcome.status in ("failed", "skipped")]
    if unfinished:
        for outcome in unfinished:
            logger.error("%s %s: %s", outcome.id, outcome.status, outcome.error)
        logger.error("%d of %d units did not finish; fix the cause and run the same command again to resume",
                     len(unfinished), len(outcomes))
        return 1

    if sharded:
        logger.info("this shard's units are finished; when every shard is, run the same command without --shard "
                    "to assemble the run folders")
        return 0
    finished = {outcome.id for outcome in outcomes}
    for unit in units:
        if unit.kind == MERGE and unit.id in finished:
            print(Path(unit.run_folder))
    return 0
