"""The runner: one cell of defense x attack x concept x model, from prompts to a result folder.

For each prompt of the concept's prompt set, the runner generates an image from the plain
prompt with the erased model (pre-attack) and runs the attack. It then generates an image from
the adversarial prompt (post-attack), judges both images with the concept's evaluator and
appends one record. It then aggregates pre-attack ASR and ASR with bootstrap intervals, the utility
metrics that are available, and the time spent in each stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmark import erasure
from benchmark.concepts import Concept, resolve_concept
from benchmark.config import (
    ConfigError, bounds, build_config, config_to_dict, identity_settings, load_config_file, merge_layers,
    parse_set_option,
)
from benchmark.generation import (
    GeneratedImage, GenerationConfig, Sampling, generate_images, image_settings, to_uint8,
)
from benchmark.images import pre_post_grid, save_png, validity
from benchmark.metrics import attack_success_rates
from benchmark.models.handle import ModelHandle
from benchmark.models.loading import ModelLoadError, generation_defaults
from benchmark.paths import cache_dir
from benchmark.plugins import AttackContext, ErasureContext, Verdict
from benchmark.prompts import PromptRecord, PromptSet
from benchmark.provenance import environment
from benchmark.registry import ATTACKS, DEFENSES, EVALUATORS, MODELS, registry_for
from benchmark.results import GRID, RunFolder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "world"
DEFAULT_CONCEPT = "circle"
PLAIN_SECTIONS = ("run", "generation")
METHOD_SECTIONS = ("defense", "attack", "evaluator")
UTILITY_EVALUATORS = ("fid", "clip-score")


@dataclass
class RunConfig:
    """Settings of the run itself."""

    seed: int = 0
    max_prompts: int = field(default=0, metadata=bounds(min=0))
    device: str = "cpu"
    utility: bool = True
    # CPU threads for torch; 0 keeps torch's default. One thread is the default because the
    # default world's small tensors gain little from more, and on a 2-core machine that runs
    # anything else, two threads ran several times slower than one.
    threads: int = field(default=1, metadata=bounds(min=0))
    grid_rows: int = field(default=16, metadata=bounds(min=0))
    # Also run the attack on a known-vulnerable erasure (benchmark.selftest) and record the
    # outcome in the summary; a failed self-test marks the attack results invalid.
    self_test: bool = False


@dataclass
class RunRequest:
    """The command-line request: methods, concept, model, config layers and output folder."""

    defense: str = "none"
    attack: str = "none"
    concept: str | None = None
    model: str | None = None
    model_config: str | None = None
    prompts: str | None = None
    config_file: str | None = None
    sets: list[str] = field(default_factory=list)
    output: Path = Path("runs")
    fresh: bool = False
    show_progress: bool = True


@dataclass
class ResolvedRun:
    """Every component of a run, resolved and validated, before anything is computed."""

    request: RunRequest
    concept: Concept
    model_name: str
    prompt_set: PromptSet
    defense_class: Any
    attack_class: Any
    evaluator_class: Any
    defense_config: Any
    attack_config: Any
    evaluator_config: Any
    generation_config: GenerationConfig
    run_config: RunConfig
    # None: resolved from the model's generation defaults.
    sampling: Sampling | None = None

    def __post_init__(self) -> None:
        if self.sampling is None:
            defaults = generation_defaults(self.model_name, self.request.model_config)
            self.sampling = Sampling.resolve(self.generation_config, defaults)

    @property
    def records(self) -> list[PromptRecord]:
        limit = self.run_config.max_prompts
        return self.prompt_set.records[:limit] if limit else self.prompt_set.records

    def plan(self) -> dict:
        """Return the resolved configuration, as the manifest records it."""
        return {
            "concept": {"name": self.concept.name, "erase_phrase": self.concept.erase_phrase, "kind": self.concept.kind,
                        "source": self.concept.source},
            "model": self.model_name,
            "prompt_set": {"id": self.prompt_set.id, "path": str(self.prompt_set.path),
                           "sha256": self.prompt_set.sha256, "n_prompts": len(self.records),
                           "n_in_file": len(self.prompt_set)},
            "defense": {"name": self.defense_class.name, "version": self.defense_class.version,
                        "config": config_to_dict(self.defense_config)},
            "attack": {"name": self.attack_class.name, "version": self.attack_class.version,
                       "config": config_to_dict(self.attack_config)},
            "evaluator": {"name": self.evaluator_class.name, "version": self.evaluator_class.version,
                          "config": config_to_dict(self.evaluator_config)},
            "generation": config_to_dict(self.generation_config),
            "sampling": dataclasses.asdict(self.sampling),
            "run": config_to_dict(self.run_config),
            "seeds": "per prompt: the CSV's evaluation_seed, else derived from (run.seed, prompt-set id, prompt id)",
        }

    def run_key(self) -> str:
        plan = self.plan()
        plan["run"] = {key: value for key, value in plan["run"].items()
                       if key not in ("device", "grid_rows", "threads", "self_test")}
        for kind, config in (("defense", self.defense_config), ("attack", self.attack_config),
                             ("evaluator", self.evaluator_config)):
            plan[kind]["config"] = identity_settings(config)
        plan["generation"] = image_settings(plan["generation"])
        return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]

    def folder_name(self) -> str:
        parts = (self.concept.name, self.defense_class.name, self.attack_class.name, Path(self.model_name).name)
        safe = "__".join("".join(c if c.isalnum() or c in "-_." else "-" for c in part) for part in parts)
        return f"{safe}__{self.run_key()[:8]}"


# ----------------------------------------------------------------------------------------
# Resolution


def _method_values(layer_list: list[dict] | dict, kind: str, name: str) -> dict:
    """Merge a method's values layer by layer, so a later generic section (``--set defense.lr``)
    beats an earlier method-specific one (the model budget's ``defense/esd-x``).

    Within a layer the generic section comes first, then the section of the method's family
    (``defense/esd`` for esd-x and esd-u), then the method's own section.
    """
    if isinstance(layer_list, dict):
        layer_list = [layer_list]
    families = [family for family, members in registry_for(kind).families.items() if name in members]
    sections = [kind] + [f"{kind}/{family}" for family in families] + [f"{kind}/{name}"]
    values: dict = {}
    for layer in layer_list:
        for section in sections:
            values.update((layer or {}).get(section, {}))
    return values


def _check_sections(layers: dict) -> None:
    """Reject a section that is not a known section or a registered method's (or family's) section."""
    for section in layers:
        kind, _, name = section.partition("/")
        if section in PLAIN_SECTIONS or section in METHOD_SECTIONS:
            continue
        if not name or kind not in METHOD_SECTIONS:
            valid = ", ".join(PLAIN_SECTIONS + METHOD_SECTIONS)
            raise ConfigError(f"unknown config section {section!r}; valid: {valid}, or 'defense/<name>' style sections")

        registry = registry_for(kind)
        if name not in registry and name not in registry.families:
            close = registry.closest(name)
            hint = f"; did you mean {kind}/{close}?" if close else ""
            raise ConfigError(f"unknown config section {section!r}: no {kind} is named {name!r}; valid names: "
                              f"{', '.join(registry.names() + sorted(registry.families))}{hint}")


def model_budgets(model_name: str) -> dict:
    """Return the budget layer that a registered model declares (the default world's budgets.yaml)."""
    if model_name not in MODELS:
        return {}
    budgets = getattr(MODELS.get(model_name), "budgets", None)
    return budgets() if callable(budgets) else {}


def reduced_budget_sections(resolved: ResolvedRun) -> list[str]:
    """Return the sections of the run's defense and attack that the model's budgets replace."""
    budgets = model_budgets(resolved.model_name)
    sections = [f"defense/{resolved.defense_class.name}", f"attack/{resolved.attack_class.name}"]
    return [section for section in sections if section in budgets]


def log_reduced_budgets(model_name: str, sections) -> None:
    """Say which methods run with the model's reduced budget instead of the reference one."""
    if sections:
        logger.info("model %s sets reduced budgets for %s (its budgets.yaml), sized for a 2-core CPU: with them "
                    "advunlearn against unlearndiffatk finishes in 10 minutes or less. The reference budgets apply "
                    "on SD v1.4, and --set overrides either", model_name, ", ".join(sections))


def config_layers(request: RunRequest, concept: Concept, model_name: str) -> list[dict]:
    """Return the config layers of a run, earliest first: the model's budgets, the concept's
    overrides and evaluator settings, ``--config``, then ``--set``."""
    file_layer = load_config_file(request.config_file) if request.config_file else {}
    set_layer: dict[str, dict] = {}
    for option in request.sets:
        section, key, value = parse_set_option(option)
        set_layer.setdefault(section, {})[key] = value
    return [model_budgets(model_name), concept.overrides, {"evaluator": concept.evaluator_settings},
            file_layer, set_layer]


def resolve(request: RunRequest) -> ResolvedRun:
    """Resolve and validate every component of a run without loading weights."""
    concept = resolve_concept(request.concept or DEFAULT_CONCEPT)
    model_name = request.model or concept.model or DEFAULT_MODEL

    defense_class = DEFENSES.get(request.defense)
    attack_class = ATTACKS.get(request.attack)
    evaluator_class = EVALUATORS.get(concept.evaluator)

    layer_list = config_layers(request, concept, model_name)
    layers = merge_layers(*layer_list)
    _check_sections(layers)

    run_config = build_config(RunConfig, layers.get("run"), "run")
    generation_config = build_config(GenerationConfig, layers.get("generation"), "generation")
    prompt_set = concept.load_prompts(global_seed=run_config.seed, path=request.prompts)
    return ResolvedRun(
        request=request,
        concept=concept,
        model_name=model_name,
        prompt_set=prompt_set,
        defense_class=defense_class,
        attack_class=attack_class,
        evaluator_class=evaluator_class,
        defense_config=build_config(defense_class.Config, _method_values(layer_list, "defense", defense_class.name),
                                    "defense", defense_class.name),
        attack_config=build_config(attack_class.Config, _method_values(layer_list, "attack", attack_class.name),
                                   "attack", attack_class.name),
        evaluator_config=build_config(evaluator_class.Config, _method_values(layer_list, "evaluator", evaluator_class.name),
                                      "evaluator", evaluator_class.name),
        generation_config=generation_config,
        run_config=run_config,
        sampling=Sampling.resolve(generation_config, generation_defaults(model_name, request.model_config)),
    )


# ----------------------------------------------------------------------------------------
# Execution


class StageTimer:
    """Wall time spent per stage, in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def measure(self, stage: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.add(stage, time.perf_counter() - self.start)

        return _Span()


class Runner:
    """Executes one resolved run into its folder."""

    def __init__(self, resolved: ResolvedRun) -> None:
        self.resolved = resolved
        self.request = resolved.request
        self.timer = StageTimer()
        self.base_model: ModelHandle | None = None
        self.model: ModelHandle | None = None
        self.evaluator = None
        self.sampling: Sampling | None = None
        self.erased_sha256: dict[str, str] | None = None
        self.erasure_cache: str | None = None
        self.folder: RunFolder | None = None

    # -- setup --------------------------------------------------------------------------

    def _load(self) -> None:
        from benchmark.models.loading import load_model

        resolved = self.resolved
        if resolved.run_config.threads:
            torch.set_num_threads(resolved.run_config.threads)
        with self.timer.measure("load"):
            self.base_model = load_model(resolved.model_name, device=resolved.run_config.device,
                                         config_dir=self.request.model_config)
            self.evaluator = resolved.evaluator_class(resolved.evaluator_config)
        self.sampling = resolved.sampling
        loaded = {"resolution": self.base_model.resolution, "default_sampler": self.base_model.default_sampler,
                  "default_steps": self.base_model.default_steps}
        if Sampling.resolve(resolved.generation_config, loaded) != resolved.sampling:
            raise ModelLoadError(
                f"model {resolved.model_name} loaded with sampling defaults {loaded}, but its configs "
                f"announced {dataclasses.asdict(resolved.sampling)}; check its generation_defaults.json"
            )
        logger.info("model %s loaded from %s", resolved.model_name, self.base_model.source)

    def _erase(self) -> None:
        resolved = self.resolved
        defense = resolved.defense_class(resolved.defense_config)
        base_hashes = self.base_model.weights_sha256()
        concept_key = {"name": resolved.concept.name, "erase_phrase": resolved.concept.erase_phrase,
                       "retain_sha256": resolved.concept.retain.sha256 if resolved.concept.retain else None}
        key = erasure.erasure_key(base_hashes, defense.identity(), concept_key, resolved.run_config.seed)
        cache_root = cache_dir() / "erased"

        with self.timer.measure("erase"):
            flat = erasure.cached_erasure(cache_root, key)
            if flat is None:
                trainee = self.base_model.copy() if resolved.defense_class.name != "none" else self.base_model
                context = ErasureContext(
                    original=self.base_model,
                    concept=resolved.concept,
                    retain_prompts=resolved.concept.load_retain(resolved.run_config.seed),
                    work_dir=cache_root / key,
                    seed=resolved.run_config.seed,
                    show_progress=self.request.show_progress,
                )
                flat = erasure.flatten(defense.erase(trainee, context))
                if flat:
                    folder = erasure.store_erasure(cache_root, key, flat, {
                        "defense": defense.describe(), "concept": concept_key, "base_sha256": base_hashes,
                        "seed": resolved.run_config.seed,
                    })
                    logger.info("erased weights saved to %s", folder)
            if flat:
                self.model = self.base_model.copy()
                erasure.apply_erased_weights(self.model, flat)
                self.model.eval()
                self.erasure_cache = str(cache_root / key)
            else:
                self.model = self.base_model
        self.erased_sha256 = self.model.weights_sha256()

    def manifest(self) -> dict:
        resolved = self.resolved
        return {
            "plan": resolved.plan(),
            "model": {"name": resolved.model_name, "source": self.base_model.source,
                      "base_sha256": self.base_model.weights_sha256(), "erased_sha256": self.erased_sha256,
                      "erased_weights_cache": self.erasure_cache},
            "sampling": dataclasses.asdict(self.sampling),
            "evaluator": self.evaluator.info(),
            "safety_checker": "off",
            "environment": environment(),
        }

    # -- one side (pre or post) -----------------------------------------------------------

    def _judge_images(self, images: list[GeneratedImage], records: list[PromptRecord], side: str,
                      folder: RunFolder) -> list[dict]:
        results = []
        valid_pixels, valid_index, valid_targets = [], [], []
        for index, (generated, record) in enumerate(zip(images, records)):
            image = generated.pixels
            reason = validity(image)
            pixels = to_uint8(image)
            path = folder.images_dir / f"{_file_id(record.id)}_{side}.png"
            save_png(pixels, path)
            results.append({"valid": reason is None, "invalid_reason": reason, "success": None,
                            "image": str(path.relative_to(folder.path))})
            if self.resolved.generation_config.precision != "fp32":
                results[-1].update(precision=generated.precision, precision_fallback=generated.precision_fallback)
            if reason is None:
                valid_pixels.append(pixels)
                valid_index.append(index)
                valid_targets.append(record.extra)

        with self.timer.measure("score"):
            verdicts = self.evaluator.score(valid_pixels, valid_targets) if valid_pixels else []
        for index, verdict in zip(valid_index, verdicts):
            results[index].update(success=bool(verdict.success), score=verdict.score, label=verdict.label,
                                  details=verdict.details)
        return results

    def _generate(self, model: ModelHandle, records: list[PromptRecord], prompts=None, text_states=None,
                  stage: str = "generate") -> list[np.ndarray]:
        images = self._generate_images(model, records, prompts=prompts, text_states=text_states, stage=stage)
        return [image.pixels for image in images]

    def _generate_images(self, model: ModelHandle, records: list[PromptRecord], prompts=None, text_states=None,
                         stage: str = "generate") -> list[GeneratedImage]:
        config = self.resolved.generation_config
        with self.timer.measure(stage):
            return generate_images(
                model, [r.seed for r in records], self._guidance(records), self.sampling,
                prompts=prompts, text_states=text_states, batch_size=config.batch_size,
                batch_invariant=config.batch_invariant, precision=config.precision, compile_unet=config.compile,
            )

    def _guidance(self, records: list[PromptRecord]) -> list[float]:
        override = self.resolved.generation_config.guidance_scale
        return [override if override >= 0 else record.guidance for record in records]

    def judge_one(self, record: PromptRecord, prompt: str | None = None, text_states=None) -> Verdict:
        """Generate one image for ``record`` (from a text or text states) and judge it; used by attacks."""
        image = self._generate(self.model, [record], prompts=None if prompt is None else [prompt],
                               text_states=text_states, stage="attack_generate")[0]
        if validity(image) is not None:
            return Verdict(success=False, score=0.0, label="invalid", details={"invalid_reason": validity(image)})
        with self.timer.measure("attack_score"):
            return self.evaluator.score([to_uint8(image)], [record.extra])[0]

    # -- prompts --------------------------------------------------------------------------

    def _attack_context(self, record: PromptRecord) -> AttackContext:
        return AttackContext(
            model=self.model, record=record, concept=self.resolved.concept, evaluator=self.evaluator,
            judge=lambda prompt=None, text_states=None: self.judge_one(record, prompt, text_states),
            original_model=lambda: self.base_model, generator=torch.Generator().manual_seed(record.seed),
            show_progress=self.request.show_progress,
        )

    def _attack_all(self, attack, chunk: list[PromptRecord]) -> list[tuple[dict, Any]]:
        """Attack the chunk's prompts: one by one, or together where the attack optimises a batch."""
        started = time.perf_counter()
        if attack_batch_size(attack) > 1:
            adversarial_prompts = attack.attack_batch([self._attack_context(record) for record in chunk])
            seconds = [(time.perf_counter() - started) / len(chunk)] * len(chunk)
        else:
            adversarial_prompts, seconds = [], []
            for record in chunk:
                adversarial_prompts.append(attack.attack(self._attack_context(record)))
                seconds.append(time.perf_counter() - started - sum(seconds))
        self.timer.add("attack", time.perf_counter() - started)
        optimised_together = len(chunk) if attack_batch_size(attack) > 1 else 1
        return [(self._attack_summary(record, adversarial, spent, optimised_together), adversarial)
                for record, adversarial, spent in zip(chunk, adversarial_prompts, seconds)]

    def _attack_summary(self, record: PromptRecord, adversarial, seconds: float, batch: int) -> dict:
        reencoded = self.model.tokenize([adversarial.text]).input_ids[0].tolist()
        summary = {
            "text": adversarial.text,
            "token_ids": list(adversarial.token_ids),
            "reencoded_token_ids_match": reencoded == list(adversarial.token_ids),
            "continuous": adversarial.text_states is not None,
            "steps": adversarial.steps,
            "succeeded_during_attack": adversarial.succeeded_during_attack,
            "seconds": round(seconds, 3),
            "batch": batch,
            "info": adversarial.info,
        }
        if not summary["reencoded_token_ids_match"]:
            summary["reencoded_token_ids"] = reencoded
        summary["artifact"] = self._write_artifact(record, adversarial, summary)
        return summary

    def _write_artifact(self, record: PromptRecord, adversarial, summary: dict) -> str:
        """Store what regenerating the post-attack image needs, without the attack code."""
        from benchmark.models.checkpoints import save_state_dict
        from benchmark.results import write_json_atomic

        folder = self.folder.path / "artifacts"
        folder.mkdir(exist_ok=True)
        stem = _file_id(record.id)
        artifact = {
            "prompt_id": record.id,
            "prompt": record.prompt,
            "text": adversarial.text,
            "token_ids": list(adversarial.token_ids),
            "reencoded_token_ids_match": summary["reencoded_token_ids_match"],
            "seed": record.seed,
            "guidance": self._guidance([record])[0],
            "target_model_sha256": self.erased_sha256,
            "attack": {"name": self.resolved.attack_class.name, "version": self.resolved.attack_class.version,
                       "config": config_to_dict(self.resolved.attack_config)},
            "attack_config_sha256": hashlib.sha256(
                json.dumps(config_to_dict(self.resolved.attack_config), sort_keys=True).encode()).hexdigest(),
            "text_states": None,
        }
        if adversarial.text_states is not None:
            save_state_dict({"text_states": adversarial.text_states}, folder / f"{stem}.safetensors")
            artifact["text_states"] = f"{stem}.safetensors"
        write_json_atomic(folder / f"{stem}.json", artifact)
        return f"artifacts/{stem}.json"

    def _run_chunk(self, attack, chunk: list[PromptRecord], folder: RunFolder) -> None:
        pre_images = self._generate_images(self.model, chunk, prompts=[r.prompt for r in chunk], stage="generate_pre")
        pre_results = self._judge_images(pre_images, chunk, "pre", folder)
        tokenized = self.model.tokenize([r.prompt for r in chunk])

        attacked = self._attack_all(attack, chunk)
        attacks = [summary for summary, _ in attacked]
        adversarial_prompts = [adversarial for _, adversarial in attacked]

        post_images = []
        for record, adversarial in zip(chunk, adversarial_prompts):
            if adversarial.text_states is not None:
                post_images += self._generate_images(self.model, [record], text_states=adversarial.text_states,
                                                     stage="generate_post")
        text_records = [r for r, a in zip(chunk, adversarial_prompts) if a.text_states is None]
        text_images = iter(self._generate_images(self.model, text_records,
                                                 prompts=[a.text for a in adversarial_prompts if a.text_states is None],
                                                 stage="generate_post")) if text_records else iter(())
        continuous_images = iter(post_images)
        ordered = [next(continuous_images) if a.text_states is not None else next(text_images)
                   for a in adversarial_prompts]
        post_results = self._judge_images(ordered, chunk, "post", folder)

        for index, record in enumerate(chunk):
            pre, post = pre_results[index], post_results[index]
            folder.append({
                "prompt_id": record.id,
                "prompt": record.prompt,
                "seed": record.seed,
                "guidance": self._guidance([record])[0],
                "prompt_tokens": tokenized.lengths[index],
                "prompt_truncated": tokenized.truncated[index],
                "pre": pre,
                "attack": attacks[index],
                "post": post,
                "success": bool((pre["valid"] and pre["success"]) or (post["valid"] and post["success"])),
            })

    # -- utility --------------------------------------------------------------------------

    def _utility(self, folder: RunFolder) -> dict:
        """Measure utility on the retain prompts; a metric that cannot be measured records the reason."""
        cached = folder.path / "utility.json"
        if cached.exists():
            return json.loads(cached.read_text())

        retain = self.resolved.concept.load_retain(self.resolved.run_config.seed)
        if not self.resolved.run_config.utility:
            skipped = {"status": "skipped", "reason": "run.utility is false"}
            return {name: dict(skipped) for name in ("retain_accuracy",) + UTILITY_EVALUATORS}
        if retain is None:
            missing = {"status": "unavailable", "reason": "the concept has no retain prompt set"}
            return {name: dict(missing) for name in ("retain_accuracy",) + UTILITY_EVALUATORS}

        records = retain.records
        logger.info("measuring utility on %d retain prompts (retain accuracy, FID, CLIP score); run.utility=false "
                    "skips it", len(records))
        images = self._generate(self.model, records, prompts=[r.prompt for r in records], stage="utility")
        valid = [(to_uint8(image), record) for image, record in zip(images, records) if validity(image) is None]
        utility = {
            "retain_accuracy": self._retain_accuracy(valid, retain),
            "fid": self._optional_metric("fid", lambda evaluator: self._fid(
                evaluator, [pixels for pixels, _ in valid], records)),
            "clip-score": self._optional_metric("clip-score", lambda evaluator: evaluator.compute(
                [pixels for pixels, _ in valid], [record.prompt for _, record in valid])),
        }
        for name, metric in utility.items():
            metric.setdefault("n_prompts", len(records))
            metric.setdefault("n_invalid", len(records) - len(valid))
            metric.setdefault("prompt_set_sha256", retain.sha256)
            if metric["status"] == "unavailable":
                logger.warning("utility metric %s is unavailable: %s", name, metric["reason"])
        cached.write_text(json.dumps(utility, indent=2, sort_keys=True))
        return utility

    def _optional_metric(self, name: str, compute) -> dict:
        if name not in EVALUATORS:
            return {"status": "unavailable", "reason": f"no evaluator named {name!r} is registered in this installation"}
        evaluator_class = EVALUATORS.get(name)
        # An invalid setting raises ConfigError here instead of becoming an "unavailable" reason.
        config = build_config(evaluator_class.Config, self._utility_settings(name), f"evaluator/{name}")
        try:
            evaluator = evaluator_class(config)
            with self.timer.measure("utility"):
                result = compute(evaluator)
        except (FileNotFoundError, RuntimeError, ValueError, OSError) as error:
            return {"status": "unavailable", "reason": f"{type(error).__name__}: {error}"}
        result.setdefault("status", "measured")
        return result

    def check_utility_settings(self) -> None:
        """Build each utility evaluator's config now, so an invalid setting fails before any prompt runs."""
        if not self.resolved.run_config.utility:
            return
        for name in UTILITY_EVALUATORS:
            if name in EVALUATORS:
                build_config(EVALUATORS.get(name).Config, self._utility_settings(name), f"evaluator/{name}")

    def _utility_settings(self, name: str) -> dict:
        """Return the ``evaluator/<name>`` section of a utility evaluator (e.g. ``--set evaluator/fid.min_images=50``).

        The layers are those of the run's methods: the model's budget, the concept's overrides,
        ``--config``, then ``--set``. The plain ``evaluator`` section belongs to the concept's evaluator.
        """
        layers = merge_layers(*config_layers(self.request, self.resolved.concept, self.resolved.model_name))
        return dict(layers.get(f"evaluator/{name}") or {})

    def _fid(self, evaluator, generated: list[np.ndarray], retain_records: list[PromptRecord]) -> dict:
        """Compute FID and KID of the retain prompts' valid images against the concept's reference set."""
        from benchmark.fid_reference import load_reference_set, reference_features

        concept = self.resolved.concept
        if concept.fid_reference is None:
            raise ValueError(f"concept {concept.name} names no FID reference image set; add fid_reference "
                             f"({{render: world_retain}} or {{folder: PATH}}) to {concept.source or 'its file'}")
        reference = load_reference_set(concept.fid_reference, retain_records)
        reference_rows = reference_features(evaluator, reference, cache_dir() / "fid" / "reference-features")
        result = evaluator.compute_from_features(evaluator.features(generated), reference_rows)
        result.update(reference=reference.description, reference_sha256=reference.sha256)
        return result

    def _retain_accuracy(self, valid: list, retain: PromptSet) -> dict:
        """Share of retain prompts whose image shows the prompted attribute, by the concept's evaluator."""
        config = self.resolved.evaluator_config
        if not hasattr(config, "target"):
            return {"status": "unavailable", "reason": f"evaluator {self.resolved.evaluator_class.name} has no "
                                                         "per-prompt target to check retain prompts against"}
        judge = self.resolved.evaluator_class(dataclasses.replace(config, target=""))
        with self.timer.measure("utility"):
            try:
                verdicts = judge.score([pixels for pixels, _ in valid], [record.extra for _, record in valid])
            except ValueError as error:
                return {"status": "unavailable", "reason": str(error)}
        return {
            "status": "measured",
            "accuracy": float(np.mean([v.success for v in verdicts])) if verdicts else None,
        }

    # -- main -----------------------------------------------------------------------------

    def run(self) -> Path:
        resolved = self.resolved
        started = time.perf_counter()
        folder_path = Path(self.request.output) / resolved.folder_name()
        self.check_utility_settings()
        with RunFolder(folder_path, resolved.run_key(), fresh=self.request.fresh) as folder:
            self.folder = folder
            self._load()
            self._erase()
            folder.write_manifest(self.manifest())

            done = {record["prompt_id"] for record in folder.records()}
            pending = [record for record in resolved.records if record.id not in done]
            if done:
                logger.info("resuming %s: %d of %d prompts already done", folder.path, len(done), len(resolved.records))

            attack = resolved.attack_class(resolved.attack_config)
            # A batched attack gets its whole batch in one chunk, and generation batches within that chunk.
            batch = max(resolved.generation_config.batch_size, attack_batch_size(attack))
            progress = tqdm(total=len(resolved.records), initial=len(resolved.records) - len(pending),
                            desc="prompts", disable=not self.request.show_progress, unit="prompt")
            for start in range(0, len(pending), batch):
                chunk = pending[start : start + batch]
                self._run_chunk(attack, chunk, folder)
                progress.update(len(chunk))
            progress.close()

            summary = self.summarize(folder)
            if resolved.run_config.self_test:
                summary.update(self._self_test())
            summary["wall_seconds_this_invocation"] = round(time.perf_counter() - started, 3)
            folder.write_summary(summary)
        return folder_path

    def _self_test(self) -> dict:
        """Run the attack self-test; a failed self-test marks this run's attack results invalid."""
        from benchmark.selftest import run_self_test

        result = run_self_test(self.resolved)
        return {"self_test": result, "attack_results_valid": result["status"] != "failed"}

    def summarize(self, folder: RunFolder) -> dict:
        resolved = self.resolved
        order = {record.id: index for index, record in enumerate(resolved.records)}
        records = sorted(folder.records(), key=lambda r: order.get(r["prompt_id"], len(order)))
        summary = attack_success_rates(records)
        summary.update(
            concept=resolved.concept.name,
            defense=resolved.defense_class.name,
            attack=resolved.attack_class.name,
            model=resolved.model_name,
            n_truncated_prompts=sum(1 for r in records if r.get("prompt_truncated")),
            n_token_mismatches=sum(1 for r in records if not r["attack"].get("reencoded_token_ids_match", True)),
            utility=self._utility(folder),
            run_key=resolved.run_key(),
        )
        summary["seconds"] = {stage: round(value, 3) for stage, value in sorted(self.timer.seconds.items())}

        if resolved.run_config.grid_rows:
            pre_post_grid(records[: resolved.run_config.grid_rows], folder.path, folder.path / GRID)
        return summary


def attack_batch_size(attack) -> int:
    """Return how many prompts the attack optimises together (1 for attacks without a batched mode)."""
    if not hasattr(attack, "attack_batch"):
        return 1
    return int(getattr(attack.config, "batch_size", 1))


def _file_id(prompt_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(prompt_id))


def run(request: RunRequest) -> Path:
    return Runner(resolve(request)).run()
