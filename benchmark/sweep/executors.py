"""Executors: run a sweep's work units in this process (``local``) or as Ray tasks (``ray``).

Both executors run the same ``execute_unit`` function on the same units, so their results are
identical. They differ only in where units run and how many run at once. A unit that raises is
logged and reported, the units that depend on it are skipped, and the others still run.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from tqdm import tqdm

from benchmark.paths import CACHE_VARIABLE, cache_dir
from benchmark.progress import library_progress_bars
from benchmark.sweep.plan import SweepError, WorkUnit
from benchmark.sweep.units import execute_unit

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = "pip install -e '.[ray]' in a checkout of this repository, or pip install 'ray>=2.60'"
# Ray runs a task again when its worker process dies, for example on a killed or lost node.
# A unit resumes from its folder, so a retry repeats no finished prompt.
RAY_MAX_RETRIES = 3


@dataclass
class UnitOutcome:
    """Result of one unit, with status ``computed``, ``done`` (already on disk), ``failed`` or ``skipped``."""

    id: str
    status: str
    seconds: float = 0.0
    error: str | None = None


def _log_outcome(outcome: UnitOutcome) -> None:
    if outcome.status == "failed":
        logger.error("%s failed: %s", outcome.id, outcome.error)
    elif outcome.status == "skipped":
        logger.warning("%s skipped: %s", outcome.id, outcome.error)
    else:
        logger.info("%s %s in %.1f s", outcome.id, outcome.status, outcome.seconds)


def _failed_dependency(unit: WorkUnit, outcomes: dict[str, UnitOutcome]) -> str | None:
    for dependency in unit.depends_on:
        outcome = outcomes.get(dependency)
        if outcome is not None and outcome.status in ("failed", "skipped"):
            return dependency
    return None


class LocalExecutor:
    """Run units one after another in this process, in plan order."""

    name = "local"

    def __init__(self, show_progress: bool = True) -> None:
        self.show_progress = show_progress

    def run(self, units: list[WorkUnit]) -> list[UnitOutcome]:
        outcomes: dict[str, UnitOutcome] = {}
        for unit in units:
            dependency = _failed_dependency(unit, outcomes)
            if dependency is not None:
                outcome = UnitOutcome(unit.id, "skipped", error=f"its dependency {dependency} did not finish")
            else:
                outcome = self._run_one(unit)
            outcomes[unit.id] = outcome
            _log_outcome(outcome)
        return list(outcomes.values())

    def _run_one(self, unit: WorkUnit) -> UnitOutcome:
        logger.info("starting %s", unit.id)
        try:
            result = execute_unit(unit, self.show_progress)
        except Exception as error:  # noqa: BLE001 - one failed unit must not stop the independent ones
            logger.debug("%s raised", unit.id, exc_info=True)
            return UnitOutcome(unit.id, "failed", error=f"{type(error).__name__}: {error}")
        return UnitOutcome(unit.id, result["status"], result["seconds"])


# ----------------------------------------------------------------------------------------
# Ray


def import_ray():
    """Import Ray, or raise ``SweepError`` saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise SweepError(f"--executor ray needs Ray, which is not installed ({error}); install it with "
                         f"{RAY_INSTALL_HINT}") from None
    return ray


def ray_resources(unit: WorkUnit) -> dict:
    """Return the Ray resource request of a unit: one GPU on a CUDA device, else ``run.threads`` CPUs."""
    if unit.device.startswith("cuda"):
        if unit.device != "cuda":
            raise SweepError(
                f"{unit.id}: run.device={unit.device} names one GPU, but Ray assigns each task its GPU through "
                "CUDA_VISIBLE_DEVICES; use --set run.device=cuda with --executor ray"
            )
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": max(1, unit.threads)}


def _execute_on_worker(unit_data: dict, cache: str, *dependencies) -> dict:
    """Run one unit as a Ray task. ``dependencies`` are the results of the units it waits for.

    Ray forwards worker output line by line and turns progress bars into empty lines, so workers
    draw none. The driver shows one bar over the units instead.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Erased weights must come from the driver's erasure cache, which a running cluster's
    # workers do not know from their own environment.
    os.environ[CACHE_VARIABLE] = cache
    library_progress_bars(False)
    return execute_unit(WorkUnit.from_dict(unit_data), show_progress=False)


class RayExecutor:
    """Submit every unit as a Ray task that waits for the tasks of the unit's dependencies.

    With ``address``, the executor connects to that running cluster, and ``auto`` finds one
    started with ``ray start`` on this machine. Without it, the executor starts a local cluster
    with ``num_cpus`` CPUs and stops it at the end. If Ray is already initialised in this
    process, that connection is used. Workers must import this package and see the same filesystem paths
    (the working directory, the results root and the erasure cache) as the driver.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, show_progress: bool = True) -> None:
        if address and num_cpus is not None:
            raise SweepError("--ray-num-cpus sets the size of a local cluster and cannot be used with --ray-address")
        if num_cpus is not None and num_cpus < 1:
            raise SweepError(f"invalid --ray-num-cpus {num_cpus}: it must be 1 or more")
        self.ray = import_ray()
        self.address = address
        self.num_cpus = num_cpus
        self.show_progress = show_progress

    def _connect(self) -> bool:
        """Connect to or start a cluster, and return whether this executor started it."""
        if self.ray.is_initialized():
            logger.info("using the Ray connection of this process")
            return False
        if self.address:
            self.ray.init(address=self.address)
            logger.info("connected to the Ray cluster at %s", self.address)
            return True
        self.ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False)
        logger.info("started a local Ray cluster with %s CPUs", self.ray.cluster_resources().get("CPU"))
        return True

    def run(self, units: list[WorkUnit]) -> list[UnitOutcome]:
        resources = {unit.id: ray_resources(unit) for unit in units}
        started = self._connect()
        try:
            self._check_gpus(resources)
            return self._run_tasks(units, resources)
        finally:
            if started:
                self.ray.shutdown()

    def _check_gpus(self, resources: dict[str, dict]) -> None:
        needed = sum(1 for request in resources.values() if request.get("num_gpus"))
        if needed and not self.ray.cluster_resources().get("GPU"):
            # An autoscaling cluster may add GPU nodes later, so this is a warning, not an error.
            logger.warning("%d units request a GPU (run.device=cuda), but the Ray cluster has none now; they wait "
                           "until a GPU node joins. Use --set run.device=cpu to run them on CPUs", needed)

    def _run_tasks(self, units: list[WorkUnit], resources: dict[str, dict]) -> list[UnitOutcome]:
        ray = self.ray
        task = ray.remote(_execute_on_worker)
        cache = str(cache_dir().resolve())
        references, units_by_reference = {}, {}
        for unit in units:
            dependencies = [references[dependency] for dependency in unit.depends_on if dependency in references]
            reference = task.options(name=unit.id, max_retries=RAY_MAX_RETRIES, retry_exceptions=False,
                                     **resources[unit.id]).remote(unit.to_dict(), cache, *dependencies)
            references[unit.id] = reference
            units_by_reference[reference] = unit

        outcomes: dict[str, UnitOutcome] = {}
        waiting = list(units_by_reference)
        progress = tqdm(total=len(waiting), desc="sweep units", unit="unit", disable=not self.show_progress)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            unit = units_by_reference[ready[0]]
            outcomes[unit.id] = self._outcome(unit, ready[0], outcomes)
            _log_outcome(outcomes[unit.id])
            progress.update(1)
        progress.close()
        return [outcomes[unit.id] for unit in units]

    def _outcome(self, unit: WorkUnit, reference, outcomes: dict[str, UnitOutcome]) -> UnitOutcome:
        try:
            result = self.ray.get(reference)
        except self.ray.exceptions.RayError as error:
            dependency = _failed_dependency(unit, outcomes)
            if dependency is not None:
                return UnitOutcome(unit.id, "skipped", error=f"its dependency {dependency} did not finish")
            cause = getattr(error, "cause", None) or error
            return UnitOutcome(unit.id, "failed", error=f"{type(cause).__name__}: {cause}")
        return UnitOutcome(unit.id, result["status"], result["seconds"])


def make_executor(name: str, ray_address: str | None = None, ray_num_cpus: int | None = None,
                  show_progress: bool = True):
    """Return the executor named ``local`` or ``ray``."""
    if name == "local":
        if ray_address or ray_num_cpus is not None:
            raise SweepError("--ray-address and --ray-num-cpus apply only to --executor ray")
        return LocalExecutor(show_progress)
    if name == "ray":
        return RayExecutor(ray_address, ray_num_cpus, show_progress)
    raise SweepError(f"unknown executor {name!r}; valid: local, ray")
