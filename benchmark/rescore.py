"""Re-generate and re-judge a run's images from its attack artifacts, without any attack code.

    python -m benchmark rescore RUN_DIR

Each ``artifacts/<id>.json`` contains what the post-attack image needs: the adversarial text (or
a safetensors file of text states), the seed and the guidance scale. The erased model comes from
the erasure cache, or from running the defense again with the run's recorded configuration.
Both images of every prompt are generated again, judged with the run's evaluator, and the
pre-attack ASR and ASR are compared with the run's records; they match exactly when the model,
sampler and evaluator are the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

from benchmark.config import build_config
from benchmark.generation import GenerationConfig, to_uint8
from benchmark.images import validity
from benchmark.metrics import attack_success_rates, outcome
from benchmark.prompts import PromptRecord
from benchmark.registry import DEFENSES, EVALUATORS

logger = logging.getLogger(__name__)

ARTIFACTS = "artifacts"


class RescoreError(ValueError):
    """Artifacts are missing or do not fit the requested defense or model."""


def find_artifacts(path: str | Path) -> tuple[Path, Path | None]:
    """Return (artifacts folder, run folder or None) for a run folder or an artifacts folder."""
    path = Path(path)
    if (path / ARTIFACTS).is_dir():
        return path / ARTIFACTS, path
    if path.is_dir() and any(path.glob("*.json")):
        run_dir = path.parent if (path.parent / "manifest.json").exists() else None
        return path, run_dir
    raise RescoreError(f"no attack artifacts in {path}: expected a run folder with an {ARTIFACTS}/ subfolder "
                       "or a folder of <prompt id>.json artifact files")


def load_artifacts(folder: Path) -> list[dict]:
    artifacts = []
    for path in sorted(folder.glob("*.json")):
        artifact = json.loads(path.read_text())
        if "prompt_id" not in artifact or "seed" not in artifact:
            raise RescoreError(f"{path} is not an attack artifact: it lacks prompt_id or seed")
        artifact["_path"] = path
        artifacts.append(artifact)
    if not artifacts:
        raise RescoreError(f"{folder} contains no artifact files")
    return artifacts


def resolve_from_manifest(manifest: dict, defense: str | None, model: str | None, output: Path,
                          show_progress: bool = False):
    """Rebuild the run's resolved components from its manifest. The attack becomes ``none``.

    ``defense`` None means the run's defense; any other name must equal it.
    """
    from benchmark.generation import Sampling
    from benchmark.runner import RunConfig, RunRequest, resolve

    plan = manifest["plan"]
    defense = defense or plan["defense"]["name"]
    if plan["defense"]["name"] != defense:
        raise RescoreError(f"the run attacked defense {plan['defense']['name']!r}, not {defense!r}; "
                           f"omit --defense or pass --defense {plan['defense']['name']}")
    concept = plan["concept"]["source"] or plan["concept"]["name"]
    base = resolve(RunRequest(defense=defense, attack="none", concept=concept, model=model or plan["model"],
                              output=output, show_progress=show_progress))

    defense_class = DEFENSES.get(defense)
    evaluator_class = EVALUATORS.get(plan["evaluator"]["name"])
    run_config = build_config(RunConfig, plan["run"], "run")
    prompt_file = Path(plan["prompt_set"]["path"])
    prompt_set = base.concept.load_prompts(global_seed=run_config.seed,
                                           path=prompt_file if prompt_file.is_file() else None)
    return dataclasses.replace(
        base,
        prompt_set=prompt_set,
        defense_config=build_config(defense_class.Config, plan["defense"]["config"], "defense"),
        evaluator_class=evaluator_class,
        evaluator_config=build_config(evaluator_class.Config, plan["evaluator"]["config"], "evaluator"),
        generation_config=build_config(GenerationConfig, plan["generation"], "generation"),
        run_config=dataclasses.replace(run_config, self_test=False),
        sampling=Sampling(**manifest["sampling"]),
    )


def _judge(runner, image, record: PromptRecord) -> dict:
    reason = validity(image)
    side = {"valid": reason is None, "invalid_reason": reason, "success": None}
    if reason is None:
        verdict = runner.evaluator.score([to_uint8(image)], [record.extra])[0]
        side.update(success=bool(verdict.success), score=verdict.score, label=verdict.label)
    return side


def _rescore_artifact(runner, artifact: dict, extras: dict) -> dict:
    from benchmark.models.checkpoints import load_state_dict

    record = PromptRecord(str(artifact["prompt_id"]), artifact["prompt"], int(artifact["seed"]),
                          float(artifact["guidance"]), extras.get(str(artifact["prompt_id"]), {}))
    model = runner.model
    pre_image = runner._generate(model, [record], prompts=[record.prompt], stage="generate_pre")[0]
    if artifact.get("text_states"):
        states = load_state_dict(artifact["_path"].parent / artifact["text_states"])["text_states"]
        post_image = runner._generate(model, [record], text_states=states, stage="generate_post")[0]
    else:
        post_image = runner._generate(model, [record], prompts=[artifact["text"]], stage="generate_post")[0]

    reencoded = model.tokenize([artifact["text"]]).input_ids[0].tolist()
    return {
        "prompt_id": record.id,
        "pre": _judge(runner, pre_image, record),
        "post": _judge(runner, post_image, record),
        "reencoded_token_ids_match": reencoded == list(artifact["token_ids"]),
    }


def _compare(rescored: list[dict], run_records: list[dict]) -> list[dict]:
    """Prompts whose pre-attack or overall success differs from the run's record."""
    by_id = {str(record["prompt_id"]): record for record in run_records}
    differences = []
    for record in rescored:
        original = by_id.get(record["prompt_id"])
        if original is None:
            differences.append({"prompt_id": record["prompt_id"], "reason": "not in the run's records"})
            continue
        _, pre_now, success_now = outcome(record)
        _, pre_then, success_then = outcome(original)
        if (pre_now, success_now) != (pre_then, success_then):
            differences.append({"prompt_id": record["prompt_id"], "pre_attack_success": [pre_then, pre_now],
                                "success": [success_then, success_now]})
    return differences


def rescore(path: str | Path, defense: str | None = None, model: str | None = None, concept: str | None = None,
            sets: list[str] | None = None, output: Path = Path("runs"), show_progress: bool = False) -> dict:
    """Rescore every artifact under ``path`` and return the ASRs, the run's ASRs and every difference.

    ``show_progress`` shows progress bars (on stderr) for a defense that has to run again and for the artifacts.
    """
    from benchmark.results import read_records
    from benchmark.runner import Runner, RunRequest, resolve

    started = time.perf_counter()
    folder, run_dir = find_artifacts(path)
    artifacts = load_artifacts(folder)
    manifest_path = run_dir / "manifest.json" if run_dir else None

    if manifest_path and manifest_path.exists():
        resolved = resolve_from_manifest(json.loads(manifest_path.read_text()), defense, model, output,
                                         show_progress=show_progress)
    elif concept and defense:
        resolved = resolve(RunRequest(defense=defense, attack="none", concept=concept, model=model,
                                      sets=list(sets or []), output=output, show_progress=show_progress))
    else:
        raise RescoreError(f"{folder} has no run manifest beside it; pass --defense and --concept (and --set "
                           "options the run used) so the evaluator and the erasure can be rebuilt")

    runner = Runner(resolved)
    runner._load()
    runner._erase()
    erased_sha256 = runner.model.weights_sha256()
    model_mismatches = [a["prompt_id"] for a in artifacts if a.get("target_model_sha256") not in (None, erased_sha256)]

    extras = {record.id: record.extra for record in resolved.prompt_set.records}
    progress = tqdm(artifacts, desc="rescore", unit="prompt", disable=not show_progress, leave=False)
    rescored = [_rescore_artifact(runner, artifact, extras) for artifact in progress]
    rates = attack_success_rates(rescored)

    result = {
        "artifacts": str(folder),
        "defense": resolved.defense_class.name,
        "model": resolved.model_name,
        "n_artifacts": len(artifacts),
        "pre_attack_asr": rates["pre_attack_asr"],
        "asr": rates["asr"],
        "n_counted": rates["n_counted"],
        "target_model_matches": not model_mismatches,
        "target_model_mismatches": model_mismatches,
        "token_id_mismatches": [r["prompt_id"] for r in rescored if not r["reencoded_token_ids_match"]],
        "records": rescored,
        "seconds": round(time.perf_counter() - started, 3),
    }
    run_records = read_records(run_dir / "records.jsonl") if run_dir else []
    if run_records:
        rescored_ids = {record["prompt_id"] for record in rescored}
        run_rates = attack_success_rates([r for r in run_records if str(r["prompt_id"]) in rescored_ids])
        result.update(run_pre_attack_asr=run_rates["pre_attack_asr"], run_asr=run_rates["asr"],
                      differences=_compare(rescored, run_records))
        result["reproduced"] = (not result["differences"] and not model_mismatches
                                and result["asr"] == result["run_asr"]
                                and result["pre_attack_asr"] == result["run_pre_attack_asr"])
    else:
        result.update(run_pre_attack_asr=None, run_asr=None, differences=[], reproduced=None)
    return result
