"""Sweep planning: expand a model x concept x defense x attack matrix into work units.

A plan lists three kinds of work unit, in this order:

- ``erasure``: train the erased weights of one (base model, concept, defense config, seed) into
  the erasure cache of ``benchmark/erasure.py``. Every cell with that defense reuses them, so
  each erasure is trained once per sweep. The ``none`` defense changes no weights and has no
  erasure unit.
- ``prompts``: run one contiguous slice of a cell's prompts (``prompts_per_shard`` of them).
  It depends on the cell's erasure unit.
- ``merge``: assemble one cell's run folder from its prompt shards. It depends on every prompt
  shard of the cell.

The plan depends only on the command line and the files it names, never on results on disk,
so every task of a Slurm job array computes the same plan and ``--shard i/n`` selects the same
units in each of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from benchmark.runner import ResolvedRun, RunRequest, log_reduced_budgets, reduced_budget_sections, resolve

ERASURE = "erasure"
PROMPTS = "prompts"
MERGE = "merge"
NO_DEFENSE = "none"
DEFAULT_PROMPTS_PER_SHARD = 10
# Attacks that train one artifact per erased model and concept on their first prompt and cache
# it on disk (CCE's textual-inversion embedding). The later prompt shards of such a cell wait
# for its first shard, so the artifact is trained once instead of once per concurrent shard.
ATTACKS_WITH_SHARED_TRAINING = frozenset({"cce"})


class SweepError(ValueError):
    """A sweep cannot be planned or run as requested: bad options, a changed config or missing records."""


@dataclass(frozen=True)
class SweepSpec:
    """The matrix and the options that every cell of a sweep shares."""

    defenses: tuple[str, ...] = ("none",)
    attacks: tuple[str, ...] = ("none",)
    concepts: tuple[str | None, ...] = (None,)
    models: tuple[str | None, ...] = (None,)
    model_config: str | None = None
    prompts: str | None = None
    config_file: str | None = None
    sets: tuple[str, ...] = ()
    output: str = "runs"
    prompts_per_shard: int = DEFAULT_PROMPTS_PER_SHARD


@dataclass(frozen=True)
class WorkUnit:
    """One schedulable piece of a sweep, self-contained so that any worker can run it.

    ``request`` contains the cell's ``RunRequest`` fields, with paths as the user wrote them.
    A worker resolves it in ``working_dir``, so relative paths and the run folder name match
    those of ``python -m benchmark run`` started there. ``run_key`` is the key of the cell
    as planned. A worker that resolves a different key raises ``SweepError``.
    """

    id: str
    kind: str
    request: dict
    working_dir: str
    run_folder: str
    run_key: str
    device: str
    threads: int
    depends_on: tuple[str, ...] = ()
    # Erasure units: the hash of the erasure's identity (see erasure_identity).
    erasure: str | None = None
    # Prompt units: the half-open range [start, stop) of the cell's prompts and their ids.
    start: int = 0
    stop: int = 0
    prompt_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["depends_on"] = list(self.depends_on)
        data["prompt_ids"] = list(self.prompt_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "WorkUnit":
        return cls(**{**data, "depends_on": tuple(data["depends_on"]), "prompt_ids": tuple(data["prompt_ids"])})

    def run_request(self, show_progress: bool) -> RunRequest:
        return RunRequest(**{**self.request, "output": Path(self.request["output"]), "sets": list(self.request["sets"]),
                             "show_progress": show_progress})

    @property
    def shard_name(self) -> str:
        """Name of a prompt unit's folder inside the cell's ``shards/`` folder."""
        return f"{self.start:05d}-{self.stop:05d}"


# ----------------------------------------------------------------------------------------
# Planning


def cell_requests(spec: SweepSpec) -> list[RunRequest]:
    """Return one ``RunRequest`` per cell, models outermost and attacks innermost."""
    if spec.prompts_per_shard < 1:
        raise SweepError(f"invalid --prompts-per-shard {spec.prompts_per_shard}: it must be 1 or more")
    cells = itertools.product(spec.models, spec.concepts, spec.defenses, spec.attacks)
    return [
        RunRequest(defense=defense, attack=attack, concept=concept, model=model, model_config=spec.model_config,
                   prompts=spec.prompts, config_file=spec.config_file, sets=list(spec.sets), output=Path(spec.output))
        for model, concept, defense, attack in cells
    ]


def erasure_identity(resolved: ResolvedRun) -> dict:
    """Return what the erased weights of a cell depend on, as far as it is known before loading the model.

    The cache key of ``benchmark/erasure.py`` also hashes the base weights. Two cells with the
    same identity load the same base model, so they share one cache entry.
    """
    concept = resolved.concept
    plan = resolved.plan()
    return {
        "model": resolved.model_name,
        "model_config": resolved.request.model_config,
        "concept": {"name": concept.name, "erase_phrase": concept.erase_phrase,
                    "retain_sha256": concept.retain.sha256 if concept.retain else None},
        "defense": resolved.defense_class(resolved.defense_config).identity(),
        "seed": resolved.run_config.seed,
    }


def erasure_digest(resolved: ResolvedRun) -> str | None:
    """Return the hash of a cell's erasure identity, or None for the ``none`` defense."""
    if resolved.defense_class.name == NO_DEFENSE:
        return None
    identity = json.dumps(erasure_identity(resolved), sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _request_fields(request: RunRequest) -> dict:
    return {"defense": request.defense, "attack": request.attack, "concept": request.concept, "model": request.model,
            "model_config": request.model_config, "prompts": request.prompts, "config_file": request.config_file,
            "sets": list(request.sets), "output": str(request.output)}


def plan_sweep(spec: SweepSpec, working_dir: str | Path | None = None) -> list[WorkUnit]:
    """Resolve every cell and return the erasure units, then the prompt units, then the merge units."""
    working_dir = str(Path(working_dir or os.getcwd()).resolve())
    erasures: dict[str, WorkUnit] = {}
    prompt_units: list[WorkUnit] = []
    merges: list[WorkUnit] = []
    reduced: dict[str, list[str]] = {}

    for request in cell_requests(spec):
        resolved = resolve(request)
        folder_name = resolved.folder_name()
        sections = reduced.setdefault(resolved.model_name, [])
        sections += [section for section in reduced_budget_sections(resolved) if section not in sections]
        common = {
            "request": _request_fields(request),
            "working_dir": working_dir,
            "run_folder": str(Path(working_dir) / request.output / folder_name),
            "run_key": resolved.run_key(),
            "device": resolved.run_config.device,
            "threads": resolved.run_config.threads,
        }

        depends_on: tuple[str, ...] = ()
        digest = erasure_digest(resolved)
        if digest is not None:
            model = Path(resolved.model_name).name
            unit_id = f"{ERASURE}/{resolved.concept.name}/{resolved.defense_class.name}/{model}/{digest[:8]}"
            erasures.setdefault(digest, WorkUnit(id=unit_id, kind=ERASURE, erasure=digest, **common))
            depends_on = (erasures[digest].id,)

        cell_units = _prompt_units(resolved, spec.prompts_per_shard, depends_on, common)
        prompt_units += cell_units
        merges.append(WorkUnit(id=f"{MERGE}/{folder_name}", kind=MERGE,
                               depends_on=tuple(unit.id for unit in cell_units), **common))

    units = list(erasures.values()) + prompt_units + merges
    _check_unique(units)
    for model_name, sections in reduced.items():
        log_reduced_budgets(model_name, sections)
    return units


def _prompt_units(resolved: ResolvedRun, per_shard: int, depends_on: tuple[str, ...], common: dict) -> list[WorkUnit]:
    """Split a cell's prompts into units of ``per_shard`` consecutive prompts."""
    records = resolved.records
    folder_name = resolved.folder_name()
    units: list[WorkUnit] = []
    for start in range(0, len(records), per_shard):
        stop = min(start + per_shard, len(records))
        waits_for = depends_on
        if units and resolved.attack_class.name in ATTACKS_WITH_SHARED_TRAINING:
            waits_for = depends_on + (units[0].id,)
        units.append(WorkUnit(id=f"{PROMPTS}/{folder_name}/{start}-{stop}", kind=PROMPTS, depends_on=waits_for,
                              start=start, stop=stop, prompt_ids=tuple(record.id for record in records[start:stop]),
                              **common))
    return units


def _check_unique(units: list[WorkUnit]) -> None:
    seen: set[str] = set()
    for unit in units:
        if unit.id in seen:
            raise SweepError(f"the sweep lists the cell of {unit.id} twice; remove the repeated name from the lists")
        seen.add(unit.id)


# ----------------------------------------------------------------------------------------
# Sharding

_SHARD_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``i/n`` (0 <= i < n), e.g. ``0/4``, as given to ``--shard``."""
    match = _SHARD_PATTERN.match(text)
    if match is None:
        raise SweepError(f"invalid --shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/4 "
                         "(in a Slurm array of N tasks: --shard $SLURM_ARRAY_TASK_ID/N)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise SweepError(f"invalid --shard {text!r}: the index must be in 0..n-1 and n at least 1, e.g. 0/4")
    return index, count


def select_shard(units: list[WorkUnit], index: int, count: int) -> list[WorkUnit]:
    """Return slice ``index`` of ``count`` of the erasure and prompt units, in plan order.

    Units are dealt round robin, so the expensive erasure units at the head of the plan are
    spread over the slices. Merge units belong to no slice: a final sweep without ``--shard``
    runs them. A prompt unit whose erasure unit is in another slice trains or waits for that
    erasure itself (see ``benchmark/sweep/units.py``).
    """
    compute = [unit for unit in units if unit.kind != MERGE]
    return compute[index::count]


def cell_folders(units: list[WorkUnit]) -> list[str]:
    """Return the run folders of the cells in ``units``, in plan order."""
    return list(dict.fromkeys(unit.run_folder for unit in units if unit.kind != ERASURE))


__all__ = [
    "ERASURE", "MERGE", "PROMPTS", "SweepError", "SweepSpec", "WorkUnit", "cell_folders", "cell_requests",
    "erasure_digest", "erasure_identity", "parse_shard", "plan_sweep", "select_shard",
]
