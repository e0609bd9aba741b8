"""Sweeps: a matrix of defense x attack x concept x model cells, split into resumable work units.

- ``plan`` expands the matrix into erasure, prompt-shard and merge units with their
  dependencies, and selects the ``--shard i/n`` slices.
- ``units`` runs one unit. Its docstring describes how prompt shards write a cell's run
  folder concurrently and resumably.
- ``executors`` runs the units in this process or as Ray tasks.
- ``command`` is the ``python -m benchmark sweep`` command.

docs/sweeps.md describes sweeps on one machine, on a Ray cluster and as a Slurm job array.
"""

from benchmark.sweep.plan import SweepError, SweepSpec, WorkUnit, parse_shard, plan_sweep, select_shard

__all__ = ["SweepError", "SweepSpec", "WorkUnit", "parse_shard", "plan_sweep", "select_shard"]
