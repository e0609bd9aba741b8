"""Re-check a measured entry: re-run its cell on the first N prompts and compare with its claims.

The re-run uses the configuration the entry recorded (defense, attack, evaluator, generation
and run settings, seed policy) on the same concept and base model, with utility metrics off.
Its pre-attack ASR and ASR must each lie in a tolerance derived from the subset size: the
central binomial interval, at the chosen confidence, of the success count of n prompts that
each succeed with the claimed rate. The first N prompts are not a random sample, so this
treats them as representative of the whole set. The base weights, the prompt set and the
evaluator weights must have the sha256 the entry recorded.

Settings that name files or hardware (evaluator weight paths, device, threads) are taken
from this machine, not from the entry; ``--set`` overrides any value, e.g. a defense's
checkpoint path.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from leaderboard.entries import read_entry
from leaderboard.schema import EntryError

DEFAULT_MAX_PROMPTS = 10
DEFAULT_CONFIDENCE = 0.99
# Settings that change where or how fast a run computes, never its numbers.
MACHINE_RUN_SETTINGS = ("device", "threads", "grid_rows")
MACHINE_EVALUATOR_SETTINGS = ("weights", "model_path", "device")


@dataclass
class RateCheck:
    """One claimed rate against its re-measured value on the subset."""

    name: str
    claimed: float
    claimed_prompts: int
    successes: int
    counted: int
    confidence: float
    low: float = field(init=False)
    high: float = field(init=False)

    def __post_init__(self) -> None:
        self.low, self.high = binomial_tolerance(self.claimed, self.counted, self.confidence)

    @property
    def measured(self) -> float:
        return self.successes / self.counted

    @property
    def passed(self) -> bool:
        return self.low - 1e-12 <= self.measured <= self.high + 1e-12

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{self.name}: claimed {self.claimed:.4f} over {self.claimed_prompts} prompts, measured "
                f"{self.measured:.4f} ({self.successes}/{self.counted}); tolerance {self.low:.4f}-{self.high:.4f} "
                f"({self.confidence:.0%} binomial interval for {self.counted} prompts at p = {self.claimed:.4f}): "
                f"{verdict}")


@dataclass
class Verification:
    path: Path
    run_dir: Path
    n_prompts: int
    checks: list[RateCheck]
    mismatches: list[str]
    notes: list[str]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks) and not self.mismatches


def binomial_tolerance(rate: float, n: int, confidence: float) -> tuple[float, float]:
    """Return the rates between which the success share of ``n`` Bernoulli(``rate``) trials falls with ``confidence``."""
    from scipy.stats import binom

    low, high = binom.interval(confidence, n, rate)
    return float(low) / n, float(high) / n


# ----------------------------------------------------------------------------------------
# The re-run


def recorded_layers(entry: dict, max_prompts: int, device: str) -> dict:
    """Config sections that reproduce the entry's run on its first ``max_prompts`` prompts."""
    manifest = entry["run"]["manifest"]
    plan = manifest["plan"]
    evaluator = {key: value for key, value in plan["evaluator"]["config"].items()
                 if key not in MACHINE_EVALUATOR_SETTINGS}
    run = {key: value for key, value in plan["run"].items() if key not in MACHINE_RUN_SETTINGS}
    run.update(max_prompts=max_prompts, utility=False, device=device)
    # Empty generation settings mean "the model's default", which can change; the resolved ones cannot.
    generation = {**plan["generation"], **{key: manifest["sampling"][key] for key in ("sampler", "steps", "resolution")}}
    return {
        f"defense/{plan['defense']['name']}": plan["defense"]["config"],
        f"attack/{plan['attack']['name']}": plan["attack"]["config"],
        f"evaluator/{plan['evaluator']['name']}": evaluator,
        "generation": generation,
        "run": run,
    }


def _concept_argument(plan: dict) -> str:
    """Return the concept's registered name, or its YAML file when the name is not registered here."""
    from benchmark.registry import CONCEPTS

    name, source = plan["concept"]["name"], plan["concept"].get("source", "")
    if name in CONCEPTS or not source or not Path(source).is_file():
        return name
    return source


def _version_notes(plan: dict) -> list[str]:
    from benchmark.registry import ATTACKS, DEFENSES, EVALUATORS

    notes = []
    for kind, registry in (("defense", DEFENSES), ("attack", ATTACKS), ("evaluator", EVALUATORS)):
        name, recorded = plan[kind]["name"], plan[kind]["version"]
        installed = registry.get(name).version
        if installed != recorded:
            notes.append(f"{kind} {name} is version {installed} here; the entry was measured with version {recorded}")
    return notes


def _compare_hashes(entry_manifest: dict, run_manifest: dict) -> tuple[list[str], list[str]]:
    """Return (mismatches that fail the check, differences that are only noted)."""
    mismatches = []
    pairs = (
        ("base weights sha256", ("model", "base_sha256")),
        ("prompt set sha256", ("plan", "prompt_set", "sha256")),
        ("evaluator weights sha256", ("evaluator", "weights_sha256")),
    )
    for label, keys in pairs:
        recorded, measured = entry_manifest, run_manifest
        for key in keys:
            recorded, measured = recorded[key], measured[key]
        if recorded != measured:
            mismatches.append(f"{label} differs: the entry recorded {json.dumps(recorded)}, this machine has "
                              f"{json.dumps(measured)}")

    notes = []
    if entry_manifest["model"]["erased_sha256"] != run_manifest["model"]["erased_sha256"]:
        notes.append("erased weights sha256 differs from the entry's; training is not bit-reproducible across "
                     "hardware and library versions, so only the rates decide")
    return mismatches, notes


def verify_entry(path: Path, max_prompts: int = DEFAULT_MAX_PROMPTS, confidence: float = DEFAULT_CONFIDENCE,
                 output: Path | None = None, device: str = "cpu", sets: list[str] | None = None,
                 show_progress: bool = False) -> Verification:
    """Re-run the entry at ``path`` on its first ``max_prompts`` prompts into ``output`` and check it."""
    from benchmark.runner import Runner, RunRequest, resolve

    entry = read_entry(Path(path))
    if entry["provenance"] != "measured":
        raise EntryError(f"{path} is a reported entry (copied from {entry['source']['title']}); only measured "
                         "entries have a run configuration to re-run")
    if max_prompts < 1:
        raise EntryError(f"--max-prompts must be at least 1, got {max_prompts}")
    if not 0 < confidence < 1:
        raise EntryError(f"--confidence must be between 0 and 1, got {confidence}")

    plan = entry["run"]["manifest"]["plan"]
    n_prompts = min(max_prompts, entry["n_prompts"])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config_path = output / "verify-config.yaml"
    config_path.write_text(yaml.safe_dump(recorded_layers(entry, n_prompts, device), sort_keys=True), encoding="utf-8")

    request = RunRequest(defense=plan["defense"]["name"], attack=plan["attack"]["name"],
                         concept=_concept_argument(plan), model=entry["model"], config_file=str(config_path),
                         sets=list(sets or []), output=output, fresh=True, show_progress=show_progress)
    run_dir = Runner(resolve(request)).run()
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())

    if summary["n_counted"] == 0:
        raise EntryError(f"{path}: no prompt of the first {n_prompts} was counted in the re-run (every image was "
                         f"invalid; see {run_dir}), so nothing can be compared. Try a larger --max-prompts")
    checks = [
        RateCheck("pre-attack ASR", entry["pre_attack_asr"], entry["n_prompts"], summary["pre_attack_successes"],
                  summary["n_counted"], confidence),
        RateCheck("ASR", entry["asr"], entry["n_prompts"], summary["successes"], summary["n_counted"], confidence),
    ]
    mismatches, notes = _compare_hashes(entry["run"]["manifest"], manifest)
    return Verification(Path(path), run_dir, n_prompts, checks, mismatches, _version_notes(plan) + notes)


# ----------------------------------------------------------------------------------------
# Command line


def _entry_files(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.rglob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"entry {path} not found; pass entry files or folders of entries")
    return files


def _peek(path: Path) -> dict:
    """Read the entry's raw fields to choose what to verify; read_entry validates the entry later."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def print_verification(result: Verification, run_folder_kept: bool) -> None:
    where = f" into {result.run_dir}" if run_folder_kept else ""
    print(f"{result.path}: re-ran the first {result.n_prompts} prompts{where}")
    for check in result.checks:
        print(f"  {check.describe()}")
    for mismatch in result.mismatches:
        print(f"  FAILED: {mismatch}")
    for note in result.notes:
        print(f"  note: {note}")
    print(f"  result: {'passed' if result.passed else 'FAILED'}")


def run_verify(paths: list[Path], max_prompts: int, confidence: float, output: Path | None, device: str,
               sets: list[str], show_progress: bool, models: list[str] | None = None) -> int:
    """Verify every measured entry among ``paths`` (files or folders); return 0 if all pass, else 1.

    Reported entries inside a folder are listed and skipped; a reported entry named directly is
    an error. With ``models``, entries on other base models are listed and skipped, e.g. SD v1.4
    entries on a CPU machine without its weights. Without ``output`` the re-runs go to a
    temporary folder that is deleted afterwards.
    """
    files = _entry_files(paths)
    explicit = {path.resolve() for path in paths if path.is_file()}
    measured = []
    for path in files:
        fields = _peek(path)
        if fields.get("provenance") == "reported" and path.resolve() not in explicit:
            print(f"{path}: reported entry, skipped (only measured entries can be re-run)")
        elif models and fields.get("model") not in models:
            print(f"{path}: base model {fields.get('model')!r} is not among {', '.join(models)}; not verified here")
        else:
            measured.append(path)
    if not measured:
        print("no measured entries to verify")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="verify-") as temporary:
        for index, path in enumerate(measured):
            folder = Path(output or temporary) / f"{index:03d}-{path.stem}"
            result = verify_entry(path, max_prompts, confidence, folder, device, sets, show_progress)
            print_verification(result, run_folder_kept=output is not None)
            results.append(result)

    failed = [result for result in results if not result.passed]
    print(f"{len(results) - len(failed)} of {len(results)} entries passed")
    return 1 if failed else 0
