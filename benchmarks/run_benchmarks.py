"""Speed benchmarks: method steps, generation and evaluators against the model calls they make.

Every row compares a piece of this suite with the bare model work it cannot avoid:

- attack and defense steps, run through the plug-ins' own code, against the UNet passes the
  step performs (counted with forward hooks during the timed steps and timed alone at the same
  shapes and with the same parameters requiring gradients); target: step <= 1.1 x those passes;
- ``benchmark.generation.generate`` against bare UNet and VAE-decoder calls for the same
  sampler steps (images/s); target: >= 0.9 x bare throughput;
- each evaluator plug-in against its raw model call (images/s); target: >= 0.9 x raw. Where the
  real weights of clip-score, object-classifier or style-classifier are missing, random weights of
  the same architecture stand in, and the row is marked random weights;
- UnlearnDiffAtk's ``attack_batch`` of 8 prompts at batch_size 8 against 8 ``attack()`` calls
  (prompts/s); target: >= 1.5 x sequential;
- in full mode, a whole ``python -m benchmark run --defense advunlearn --attack unlearndiffatk``
  (wall and CPU seconds); target: under 10 minutes.

Each measurement runs in its own subprocess, so that its peak resident memory (ru_maxrss)
belongs to it alone. Torch runs on one CPU thread everywhere.

    python benchmarks/run_benchmarks.py --quick                 # the default world, a few minutes
    python benchmarks/run_benchmarks.py                         # adds SD v1.4 (random weights) and a run
    python benchmarks/run_benchmarks.py --smoke --model tiny-random --output-dir /tmp/bench

The table goes to stdout; ``docs/benchmarks.md`` and ``docs/benchmarks.json`` are written
unless ``--output-dir`` names another folder.
With ``--only``, the rows measured replace those of the same name in an existing
``benchmarks.json`` of the same mode, and the other rows stay.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ATTACKS = ("unlearndiffatk", "p4d-n", "p4d-k", "cce")
DEFENSES = ("esd-x", "esd-u", "fmn", "advunlearn")
EVALUATORS = ("world-classifier", "nudenet", "clip-score", "fid", "style-classifier", "object-classifier")
GENERATION_VARIANTS = ("batch-invariant", "batched")
FULL_SIZE_MODEL = "sd-v1-4-random"
# Concept whose phrase, prompts and retain prompts each model's methods use.
CONCEPTS = {"world": "circle", "tiny-random": "circle", FULL_SIZE_MODEL: "church"}

STEP_TARGET = 1.1
THROUGHPUT_TARGET = 0.9
RUN_TARGET_SECONDS = 600.0


# ----------------------------------------------------------------------------------------
# Modes


@dataclass(frozen=True)
class Repeats:
    """How often each kind of measurement repeats in one mode."""

    floor_warmup: int
    floor_repeats: int
    # Timed steps of a method with a single-step entry point, after one untimed step.
    timed_steps: int
    # A method without one runs twice, with these two iteration counts, and the difference is divided.
    short_run: int
    long_run: int
    run_repeats: int
    generation_prompts: int
    generation_steps: int  # 0: the model's default steps
    generation_repeats: int
    evaluator_images: int
    evaluator_repeats: int


MODES = {
    "smoke": Repeats(floor_warmup=1, floor_repeats=1, timed_steps=1, short_run=1, long_run=6, run_repeats=1,
                     generation_prompts=2, generation_steps=2, generation_repeats=1, evaluator_images=2,
                     evaluator_repeats=1),
    "quick": Repeats(floor_warmup=2, floor_repeats=5, timed_steps=8, short_run=2, long_run=8, run_repeats=3,
                     generation_prompts=4, generation_steps=0, generation_repeats=5, evaluator_images=16,
                     evaluator_repeats=7),
    "full": Repeats(floor_warmup=3, floor_repeats=7, timed_steps=16, short_run=2, long_run=14, run_repeats=5,
                    generation_prompts=8, generation_steps=0, generation_repeats=7, evaluator_images=32,
                    evaluator_repeats=11),
}
# The full-size architecture takes seconds per UNet pass on one CPU thread, so it gets fewer repeats
# and 4 sampler steps per image.
FULL_SIZE_REPEATS = Repeats(floor_warmup=1, floor_repeats=3, timed_steps=3, short_run=1, long_run=3, run_repeats=2,
                            generation_prompts=2, generation_steps=4, generation_repeats=2, evaluator_images=0,
                            evaluator_repeats=0)
# "sd-v1-4-random@512" is the full-size architecture at SD v1.4's own 512 x 512 pixels. There a UNet
# forward and backward pass takes about 20 s on one CPU thread, so only the attack steps and ESD-u
# are measured. Each gets one floor sample per pass kind, two timed steps, and two pairs of runs of
# 1 and 2 iterations. ESD-u's Adam update over 813 M parameters is the defense cost that does not
# shrink with the resolution. Its row alone takes about 35 minutes and peaks near 19 GiB of memory.
REFERENCE_RESOLUTION = 512
FULL_SIZE_AT_REFERENCE = f"{FULL_SIZE_MODEL}@{REFERENCE_RESOLUTION}"
REFERENCE_RESOLUTION_TASKS = {("attack", name) for name in ATTACKS} | {("defense", "esd-u")}
REFERENCE_RESOLUTION_REPEATS = dataclasses.replace(FULL_SIZE_REPEATS, floor_repeats=1, timed_steps=2, long_run=2,
                                                   run_repeats=2)
DEFAULT_MODELS = {"smoke": ("tiny-random",), "quick": ("world",),
                  "full": ("world", FULL_SIZE_MODEL, FULL_SIZE_AT_REFERENCE)}
KNOWN_MODELS = ("world", "tiny-random", FULL_SIZE_MODEL)


def split_model_label(label: str) -> tuple[str, int | None]:
    """Split a model label such as ``sd-v1-4-random@512`` into the model name and its resolution in pixels."""
    name, _, pixels = label.partition("@")
    if name not in KNOWN_MODELS:
        raise SystemExit(f"--model: unknown model {name!r}; valid: {', '.join(KNOWN_MODELS)}")
    if not pixels:
        return name, None
    if name != FULL_SIZE_MODEL or not pixels.isdigit() or int(pixels) % 64:
        raise SystemExit(f"--model: {label!r} is invalid: only {FULL_SIZE_MODEL} takes a resolution suffix, "
                         f"a multiple of 64 such as {FULL_SIZE_AT_REFERENCE}")
    return name, int(pixels)


def repeats_for(mode: str, label: str) -> Repeats:
    model_name, pixels = split_model_label(label)
    if pixels is not None and mode != "smoke":
        return REFERENCE_RESOLUTION_REPEATS
    if model_name == FULL_SIZE_MODEL and mode != "smoke":
        return FULL_SIZE_REPEATS
    return MODES[mode]


# ----------------------------------------------------------------------------------------
# Timing helpers


def median_seconds(function: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Return the median wall time of ``function`` over ``repeats`` calls after ``warmup`` calls."""
    times = []
    for index in range(warmup + repeats):
        started = time.perf_counter()
        function()
        elapsed = time.perf_counter() - started
        if index >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def alternating_medians(first: Callable[[], Any], second: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Time two functions in alternation after one untimed call each, and return both medians.

    Alternating exposes both to the same background load, which matters on a shared machine.
    """
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for function, samples in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            function()
            samples.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------
# Counting model passes


@dataclass(frozen=True)
class PassKind:
    """One kind of model call: which module, input shapes, and whether a backward pass follows."""

    module: str  # "unet" or "text_encoder"
    batch: int
    shape: tuple  # UNet: latent (channels, height, width); text encoder: (positions,)
    context: tuple  # UNet: text states (positions, width); text encoder: ()
    backward: bool

    def describe(self) -> str:
        size = "x".join(map(str, self.shape[1:] if self.module == "unet" else self.shape))
        return f"{'fwd+bwd' if self.backward else 'fwd'} batch {self.batch} at {size}"


class PassRecorder:
    """Records every UNet and text-encoder call of some models, split into steps by ``mark_step``.

    A call made with gradients enabled counts as forward plus backward: every method here
    backpropagates through each call it makes with gradients on. The hooks only append to a
    counter, which costs microseconds against milliseconds per call.
    """

    def __init__(self, *models) -> None:
        self.steps: list[collections.Counter] = []
        self.current: collections.Counter = collections.Counter()
        self.recording = True
        self._handles = []
        seen = set()
        for model in models:
            for module, kind in ((model.unet, "unet"), (model.text_encoder.encoder, "text_encoder")):
                if id(module) in seen:
                    continue
                seen.add(id(module))
                self._handles.append(module.register_forward_pre_hook(self._hook(kind), with_kwargs=True))

    def _hook(self, kind: str):
        def record(module, args, kwargs):
            if not self.recording:
                return
            backward = torch.is_grad_enabled()
            if kind == "unet":
                latents = args[0] if args else kwargs["sample"]
                states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
                self.current[PassKind("unet", latents.shape[0], tuple(latents.shape[1:]),
                                      tuple(states.shape[1:]), backward)] += 1
            else:
                embeddings = kwargs.get("inputs_embeds", args[0] if args else None)
                self.current[PassKind("text_encoder", embeddings.shape[0], (embeddings.shape[1],), (), backward)] += 1
        return record

    def mark_step(self) -> collections.Counter:
        """Close the current step and return its passes."""
        self.steps.append(self.current)
        self.current = collections.Counter()
        return self.steps[-1]

    def reset(self) -> None:
        self.steps, self.current = [], collections.Counter()

    def total(self) -> collections.Counter:
        total = collections.Counter(self.current)
        for step in self.steps:
            total.update(step)
        return total

    @contextmanager
    def paused(self):
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class GradientSetup:
    """The parameters and inputs that require gradients in a method's backward passes."""

    unet_parameters: list[str] = dataclasses.field(default_factory=list)
    unet_states: bool = True
    text_parameters: list[str] = dataclasses.field(default_factory=list)
    text_inputs: bool = True


@contextmanager
def only_trainable(module: torch.nn.Module, names: list[str]):
    """Let exactly ``names`` of ``module`` require gradients inside the block, then restore the flags.

    Gradients are dropped on entry and after the block, so the timed backward passes start
    from none, as after ``zero_grad``. Between two training steps that loses nothing: every
    method here zeroes the gradients before its next backward pass, and dropping them keeps a
    full-size UNet's gradients from being held twice.
    """
    parameters = dict(module.named_parameters())
    flags = {name: parameter.requires_grad for name, parameter in parameters.items()}
    for parameter in parameters.values():
        parameter.requires_grad_(False)
        parameter.grad = None
    selected = [parameters[name] for name in names]
    for parameter in selected:
        parameter.requires_grad_(True)
    try:
        yield selected
    finally:
        for name, parameter in parameters.items():
            parameter.grad = None
            parameter.requires_grad_(flags[name])


class FloorSampler:
    """Times single model calls of the kinds a method step made, alone, with the method's gradient setup.

    Sampling right after each step exposes the floor to the same background load as the step.
    """

    def __init__(self, model, setup: GradientSetup, warmup: int, repeats: int) -> None:
        self.model = model
        self.setup = setup
        self.warmup = warmup
        self.repeats = repeats
        self.samples: dict[PassKind, list[float]] = collections.defaultdict(list)

    def step_floor(self, passes: collections.Counter) -> dict[str, float]:
        """Time each kind in ``passes`` and return the seconds of the step's UNet and text-encoder passes."""
        floor = {"unet": 0.0, "text_encoder": 0.0}
        for kind, count in passes.items():
            seconds = self.time_kind(kind)
            floor[kind.module] += count * seconds
        return floor

    def time_kind(self, kind: PassKind) -> float:
        """Return the median of ``repeats`` calls of ``kind``, with warm-up calls the first time it is seen."""
        module, names = self._module_and_parameters(kind)
        with only_trainable(module, names if kind.backward else []):
            warmup = 0 if self.samples[kind] else self.warmup
            seconds = median_seconds(self._call(kind), warmup, self.repeats)
        self.samples[kind].append(seconds)
        return seconds

    def _module_and_parameters(self, kind: PassKind) -> tuple[torch.nn.Module, list[str]]:
        if kind.module == "unet":
            return self.model.unet, self.setup.unet_parameters
        return self.model.text_encoder, self.setup.text_parameters

    def _call(self, kind: PassKind) -> Callable[[], None]:
        model = self.model
        generator = torch.Generator().manual_seed(0)
        device, dtype = model.device, model.dtype
        if kind.module == "unet":
            latents = torch.randn((kind.batch,) + kind.shape, generator=generator).to(device, dtype)
            timesteps = torch.full((kind.batch,), 500, device=device, dtype=torch.long)
            inputs = torch.randn((kind.batch,) + kind.context, generator=generator).to(device, dtype)
            inputs_grad, trainable = self.setup.unet_states, self.setup.unet_parameters

            def forward(states):
                return model.unet(latents, timesteps, encoder_hidden_states=states).sample
        else:
            width = model.text_encoder.config.hidden_size
            inputs = torch.randn((kind.batch, kind.shape[0], width), generator=generator).to(device, dtype)
            inputs_grad, trainable = self.setup.text_inputs, self.setup.text_parameters
            forward = model.encode_word_embeddings

        if not kind.backward:
            def call() -> None:
                with torch.no_grad():
                    forward(inputs)
            return call

        if not inputs_grad and not trainable:
            raise ValueError(f"a backward {kind.module} pass needs trainable parameters or inputs")
        leaf = inputs.clone().requires_grad_(inputs_grad)

        def call() -> None:
            forward(leaf).float().square().mean().backward()
            leaf.grad = None
        return call


def mean_passes(counters: list[collections.Counter]) -> dict[PassKind, float]:
    total = collections.Counter()
    for counter in counters:
        total.update(counter)
    return {kind: count / len(counters) for kind, count in total.items()}


def describe_passes(passes: dict[PassKind, float], module: str) -> str:
    parts = [f"{count:.3g} x {kind.describe()}" for kind, count in sorted(passes.items(), key=lambda item: -item[1])
             if kind.module == module]
    return ", ".join(parts) or "none"


def count_noun(count: int, singular: str, plural: str | None = None) -> str:
    """Return the count followed by the noun in singular or plural, such as "1 image" or "8 images"."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def images_phrase(count: int, side: int) -> str:
    """Return e.g. "8 images of 512 x 512 pixels"."""
    return f"{count_noun(count, 'image')} of {side} x {side} pixels"


# ----------------------------------------------------------------------------------------
# Models, concepts and method configs


def load_benchmark_model(model_name: str, resolution: int):
    """Load a model with its weights frozen, setting the full-size model to ``resolution`` pixels."""
    from benchmark.models.loading import load_model

    model = load_model(model_name)
    if model_name == FULL_SIZE_MODEL:
        model.resolution = resolution
    return model


def concept_for(model_name: str):
    from benchmark.concepts import resolve_concept

    return resolve_concept(CONCEPTS.get(model_name, "circle"))


def method_config(kind: str, name: str, overrides: dict) -> Any:
    """Build a method's config as the runner does on the default world: its defaults, the world budget, overrides.

    Every model uses the world budgets of ``benchmark/world/budgets.yaml``, so that each method
    runs for minutes, not hours, on the full-size architecture.
    """
    from benchmark.config import build_config
    from benchmark.registry import ATTACKS, DEFENSES as DEFENSE_REGISTRY
    from benchmark.runner import model_budgets

    registry = ATTACKS if kind == "attack" else DEFENSE_REGISTRY
    plugin_class = registry.get(name)
    budgets = model_budgets("world")
    values = {**budgets.get(kind, {}), **budgets.get(f"{kind}/{name}", {}), **overrides}
    return plugin_class, build_config(plugin_class.Config, values, kind)


def attack_context(model, concept, generator_seed: int = 7):
    from benchmark.plugins import AttackContext, Verdict

    record = concept.load_prompts().records[0]
    verdict = Verdict(success=False, score=0.0)

    class NeverSucceeds:
        def score(self, images, targets=None):
            return [verdict for _ in images]

    return AttackContext(
        model=model, record=record, concept=concept, evaluator=NeverSucceeds(),
        judge=lambda prompt=None, text_states=None: verdict, original_model=lambda: model,
        generator=torch.Generator().manual_seed(generator_seed), show_progress=False,
    )


# ----------------------------------------------------------------------------------------
# Attack and defense steps


@dataclass
class StepTimes:
    """Timed steps of a method, the passes each made and the floor of those passes."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    passes: list[collections.Counter] = dataclasses.field(default_factory=list)
    unet_floor: list[float] = dataclasses.field(default_factory=list)
    text_encoder_floor: list[float] = dataclasses.field(default_factory=list)

    def add(self, seconds: float, passes: collections.Counter, floor: dict[str, float]) -> None:
        self.seconds.append(seconds)
        self.passes.append(passes)
        self.unet_floor.append(floor["unet"])
        self.text_encoder_floor.append(floor["text_encoder"])


def step_row(name: str, kind: str, times: StepTimes, sampler: FloorSampler, how: str, notes: list[str]) -> dict:
    """Build a method row: the step time against the time of the UNet passes it made.

    The ratio is the median over the timed steps of each step's time over the floor of its own
    passes, because the passes differ between steps (ESD's partial DDIM run has a random length).
    """
    passes = mean_passes(times.passes)
    seconds = statistics.median(times.seconds)
    unet_floor = statistics.median(times.unet_floor)
    text_floor = statistics.median(times.text_encoder_floor)
    ratio = statistics.median(step / floor for step, floor in zip(times.seconds, times.unet_floor)) \
        if unet_floor > 0 else None
    model_ratio = statistics.median(
        step / (unet + text) for step, unet, text in zip(times.seconds, times.unet_floor, times.text_encoder_floor))
    return {
        "kind": kind,
        "name": name,
        "status": "measured",
        "seconds": seconds,
        "baseline_seconds": unet_floor,
        "baseline": "UNet passes of one step",
        "ratio": ratio,
        "target": f"<= {STEP_TARGET}",
        "passed": ratio is not None and ratio <= STEP_TARGET,
        "details": {
            "how": how,
            "step_seconds": times.seconds,
            "unet_floor_seconds": times.unet_floor,
            "unet_passes_per_step": describe_passes(passes, "unet"),
            "text_encoder_passes_per_step": describe_passes(passes, "text_encoder"),
            "pass_seconds": {kind.describe() + f" ({kind.module})": statistics.median(values)
                             for kind, values in sampler.samples.items()},
            "text_encoder_floor_seconds": text_floor,
            "ratio_to_unet_and_text_encoder": model_ratio,
            "notes": notes,
        },
    }


def attack_gradients() -> GradientSetup:
    # The attacks optimise word embeddings: every weight is frozen and gradients reach the text states.
    return GradientSetup(unet_parameters=[], unet_states=True, text_parameters=[], text_inputs=True)


def measure_unlearndiffatk(model, model_name: str, repeats: Repeats) -> dict:
    """Time ``UnlearnDiffAtk._step``, the attack's single Adam step, on one prompt."""
    from attacks.unlearndiffatk import timestep_schedule

    attack_class, config = method_config("attack", "unlearndiffatk", {"target_steps": 1})
    attack = attack_class(config)
    context = attack_context(model, concept_for(model_name))
    state = attack._start(context)
    scheduler = model.noise_scheduler()
    timestep = timestep_schedule(config.timesteps, scheduler.config.num_train_timesteps)[0]

    recorder = PassRecorder(model)
    sampler = FloorSampler(model, attack_gradients(), repeats.floor_warmup, repeats.floor_repeats)
    times = StepTimes()
    try:
        for index in range(1 + repeats.timed_steps):
            started = time.perf_counter()
            attack._step([state], timestep, scheduler)
            elapsed = time.perf_counter() - started
            passes = recorder.mark_step()
            with recorder.paused():
                floor = sampler.step_floor(passes)
            if index:
                times.add(elapsed, passes, floor)
    finally:
        recorder.close()
    how = "UnlearnDiffAtk._step (one Adam step of one prompt), after one untimed step"
    return step_row("unlearndiffatk", "attack", times, sampler, how, [f"k = {state.k} adversarial tokens"])


BATCHED_ATTACKS = ("unlearndiffatk",)
ATTACK_BATCH = 8
BATCH_TARGET = 1.5


def measure_batched_unlearndiffatk(model, model_name: str, repeats: Repeats) -> dict:
    """Time ``attack_batch`` of 8 prompts at batch_size 8 against 8 ``attack()`` calls, per prompt.

    Both run the same settings: one timestep block of ``timed_steps`` steps (at least 2), a
    one-step target image, and the stub judge, which never succeeds, so no prompt stops early.
    The UNet and text-encoder passes each path makes are counted and timed alone afterwards, to
    show how much of the gain the batched passes themselves allow.
    """
    concept = concept_for(model_name)
    records = concept.load_prompts().records[:ATTACK_BATCH]
    steps = max(2, repeats.timed_steps)
    overrides = {"timesteps": 1, "steps_per_timestep": steps, "target_steps": 1}
    _, single_config = method_config("attack", "unlearndiffatk", overrides)
    attack_class, batch_config = method_config("attack", "unlearndiffatk", {**overrides, "batch_size": ATTACK_BATCH})

    def contexts():
        built = []
        for index, record in enumerate(records):
            context = attack_context(model, concept, generator_seed=7 + index)
            context.record = record
            built.append(context)
        return built

    def batched() -> None:
        attack_class(batch_config).attack_batch(contexts())

    def sequential() -> None:
        attack = attack_class(single_config)
        for context in contexts():
            attack.attack(context)

    batched_seconds, sequential_seconds = alternating_medians(batched, sequential, repeats.run_repeats)

    # Which passes each path makes, and what those passes cost alone.
    recorder = PassRecorder(model)
    passes = {}
    try:
        for label, function in (("batched", batched), ("sequential", sequential)):
            recorder.reset()
            function()
            passes[label] = recorder.total()
    finally:
        recorder.close()
    sampler = FloorSampler(model, attack_gradients(), repeats.floor_warmup, repeats.floor_repeats)
    floors = {label: sampler.step_floor(counter) for label, counter in passes.items()}

    count = len(records)
    ratio = sequential_seconds / batched_seconds
    floor_ratio = {module: floors["sequential"][module] / floors["batched"][module]
                   for module in ("unet", "text_encoder") if floors["batched"][module] > 0}
    step_kinds = {label: [kind for kind in counter if kind.module == "unet" and kind.backward]
                  for label, counter in passes.items()}
    notes = []
    passed = ratio >= BATCH_TARGET
    if not passed:
        unet_gain = floor_ratio.get("unet", 0.0)
        notes.append(f"target missed: the timed UNet passes alone run only {unet_gain:.2f}x faster at batch "
                     f"{ATTACK_BATCH} than one prompt at a time ("
                     f"{format_seconds(floors['batched']['unet'])} against "
                     f"{format_seconds(floors['sequential']['unet'])} per run of {count} prompts), so one CPU "
                     "thread gains little from batching")
    return {
        "kind": "batched-attack",
        "name": "unlearndiffatk",
        "status": "measured",
        "seconds": batched_seconds / count,
        "baseline_seconds": sequential_seconds / count,
        "baseline": f"{count} sequential attack() calls",
        "prompts_per_second": count / batched_seconds,
        "baseline_prompts_per_second": count / sequential_seconds,
        "ratio": ratio,
        "target": f">= {BATCH_TARGET}",
        "passed": passed,
        "details": {
            "how": (f"attack_batch() of {count} prompts with batch_size {ATTACK_BATCH} against {count} attack() "
                    f"calls. Both run {steps} steps at one timestep, a 1-step target image and a judge that never "
                    f"succeeds. Medians of {repeats.run_repeats} alternating runs after one untimed run each"),
            "batched_seconds": batched_seconds,
            "sequential_seconds": sequential_seconds,
            "unet_passes": {label: describe_passes(mean_passes([counter]), "unet")
                            for label, counter in passes.items()},
            "text_encoder_passes": {label: describe_passes(mean_passes([counter]), "text_encoder")
                                    for label, counter in passes.items()},
            "pass_floor_seconds": floors,
            "pass_floor_ratio": floor_ratio,
            "step_batch_sizes": {label: sorted({kind.batch for kind in kinds}) for label, kinds in step_kinds.items()},
            "notes": notes,
        },
    }


def differential_step(run: Callable[[int], None], model, setup: GradientSetup,
                      repeats: Repeats) -> tuple[StepTimes, FloorSampler, dict]:
    """Time a method run with two iteration counts, whose difference divided gives one iteration.

    The setup both runs share (target images, caches) cancels in the difference. The floor of
    one iteration's passes is sampled after each pair of runs.
    """
    short, long = repeats.short_run, repeats.long_run
    recorder = PassRecorder(model)
    sampler = FloorSampler(model, setup, repeats.floor_warmup, repeats.floor_repeats)
    timings: dict[int, list[float]] = {short: [], long: []}
    floors: list[dict[str, float]] = []
    try:
        run(short)  # untimed: builds caches such as the model's weight hashes
        for _ in range(repeats.run_repeats):
            totals = {}
            for iterations in (short, long):
                recorder.reset()
                started = time.perf_counter()
                run(iterations)
                timings[iterations].append(time.perf_counter() - started)
                totals[iterations] = recorder.total()
            per_iteration = collections.Counter()
            for kind, count in totals[long].items():
                difference = (count - totals[short].get(kind, 0)) / (long - short)
                if difference:
                    per_iteration[kind] = difference
            with recorder.paused():
                floors.append(sampler.step_floor(per_iteration))
    finally:
        recorder.close()

    seconds = (statistics.median(timings[long]) - statistics.median(timings[short])) / (long - short)
    if seconds <= 0:
        raise RuntimeError(f"the {long}-iteration runs (median {statistics.median(timings[long]):.4f} s) were not "
                           f"slower than the {short}-iteration runs ({statistics.median(timings[short]):.4f} s): "
                           "background load hid the difference; rerun this row with --only")
    times = StepTimes()
    times.add(seconds, per_iteration, {module: statistics.median(floor[module] for floor in floors)
                                        for module in ("unet", "text_encoder")})
    return times, sampler, {f"{iterations} iterations": values for iterations, values in timings.items()}


def measure_p4d(model, model_name: str, name: str, repeats: Repeats) -> dict:
    """Time P4D iterations through ``attack()``, with iterations set to two counts."""
    concept = concept_for(model_name)
    # Only iteration 0 is evaluated, and the stub judge returns at once.
    base = {"target_candidates": 1, "target_steps": 1, "selection": "evaluator", "stop_on_success": False,
            "eval_every": 1_000_000, "eval_steps": 1}

    def run(iterations: int) -> None:
        attack_class, config = method_config("attack", name, {**base, "iterations": iterations})
        attack_class(config).attack(attack_context(model, concept))

    times, sampler, timings = differential_step(run, model, attack_gradients(), repeats)
    how = (f"attack() with iterations {repeats.short_run} and {repeats.long_run}; "
           "the time difference divided by the iteration difference")
    row = step_row(name, "attack", times, sampler, how, [])
    row["details"]["run_seconds"] = timings
    return row


@contextmanager
def temporary_cache():
    """Point the suite's cache at an empty folder inside the block."""
    from benchmark.paths import CACHE_VARIABLE

    previous = os.environ.get(CACHE_VARIABLE)
    with tempfile.TemporaryDirectory() as folder:
        os.environ[CACHE_VARIABLE] = folder
        try:
            yield Path(folder)
        finally:
            if previous is None:
                os.environ.pop(CACHE_VARIABLE, None)
            else:
                os.environ[CACHE_VARIABLE] = previous


def measure_cce(model, model_name: str, repeats: Repeats) -> dict:
    """Time CCE's textual-inversion updates through ``attack()``, with max_train_steps set to two counts."""
    concept = concept_for(model_name)
    base = {"num_train_images": 2, "image_steps": 1}

    def run(steps: int) -> None:
        attack_class, config = method_config("attack", "cce", {**base, "max_train_steps": steps})
        # An empty cache, so that the inversion is trained rather than read back.
        with temporary_cache():
            attack_class(config).attack(attack_context(model, concept))

    times, sampler, timings = differential_step(run, model, attack_gradients(), repeats)
    _, config = method_config("attack", "cce", base)
    how = (f"attack() with max_train_steps {repeats.short_run} and {repeats.long_run}; "
           "the time difference divided by the update difference")
    micro_batches = count_noun(config.gradient_accumulation_steps, "micro-batch", "micro-batches")
    notes = [f"one update is {micro_batches} of {config.train_batch_size}"]
    row = step_row("cce", "attack", times, sampler, how, notes)
    row["details"]["run_seconds"] = timings
    return row


def defense_gradients(model, name: str, config) -> GradientSetup:
    from defenses._common import text_encoder_parameter_names, unet_parameter_names

    if name in ("esd-x", "esd-u"):
        parameter_set = {"esd-x": "xattn", "esd-u": "noxattn"}[name]
        return GradientSetup(unet_parameter_names(model.unet, parameter_set), unet_states=False)
    if name == "fmn":
        parameter_set = "xattn" if config.only_optimize_ca else "full"
        return GradientSetup(unet_parameter_names(model.unet, parameter_set), unet_states=False)
    if config.train_method == "text_encoder_full":
        return GradientSetup([], unet_states=True, text_parameters=text_encoder_parameter_names(model.text_encoder),
                             text_inputs=False)
    return GradientSetup(unet_parameter_names(model.unet, config.train_method), unet_states=False)


def measure_defense(model, model_name: str, name: str, repeats: Repeats) -> dict:
    """Time training steps through ``erase()``, from the ``step_callback`` each step ends with."""
    from benchmark.plugins import ErasureContext

    # FMN calls its iteration count "steps".
    overrides = {"steps" if name == "fmn" else "iterations": 1 + repeats.timed_steps, "checkpoint_every": 0}
    if name == "fmn":
        overrides.update(num_images=1, image_steps=1)
    if name == "advunlearn":
        overrides["warmup_iterations"] = 0
    defense_class, config = method_config("defense", name, overrides)
    defense = defense_class(config)
    concept = concept_for(model_name)

    # On the full-size model the frozen original is the trained model itself, which saves a 4.3 GB copy.
    # Every step makes the same calls either way, so the step time does not change.
    shared = model_name == FULL_SIZE_MODEL
    trainee = model if shared else model.copy()
    context = ErasureContext(original=model, concept=concept, retain_prompts=concept.load_retain(0), work_dir=None,
                             seed=0, show_progress=False)

    recorder = PassRecorder(trainee, model)
    sampler = FloorSampler(trainee, defense_gradients(trainee, name, config), repeats.floor_warmup,
                           repeats.floor_repeats)
    times = StepTimes()
    started = [time.perf_counter()]

    def step_ended(step: int, loss: float) -> None:
        elapsed = time.perf_counter() - started[0]
        passes = recorder.mark_step()
        with recorder.paused():
            floor = sampler.step_floor(passes)
        if step:
            times.add(elapsed, passes, floor)
        started[0] = time.perf_counter()

    defense.step_callback = step_ended
    try:
        defense.erase(trainee, context)
    finally:
        recorder.close()
        trainee.eval()

    notes = []
    if name == "advunlearn":
        notes.append(f"every step runs the {config.attack_steps}-step inner attack (no warm-up steps)")
    if name in ("esd-x", "esd-u", "advunlearn"):
        notes.append(f"DDIM grid of {config.ddim_steps} steps, with a partial run of random length every step")
    if shared:
        notes.append("the frozen original is the trained model itself, to fit in memory")
    how = ("erase() timed from one step_callback to the next, with the floor passes timed inside the callback; "
           "the first step is untimed")
    return step_row(name, "defense", times, sampler, how, notes)


# ----------------------------------------------------------------------------------------
# Generation


def bare_generation(model, states: torch.Tensor, latents: torch.Tensor, timesteps, batch: int) -> None:
    """Run the UNet calls and VAE decodes of a generation, without text encoding or sampler arithmetic."""
    with torch.no_grad():
        for start in range(0, latents.shape[0], batch):
            chunk = latents[start : start + batch]
            pair = torch.cat([states[: chunk.shape[0]], states[: chunk.shape[0]]])
            doubled = torch.cat([chunk, chunk])
            for timestep in timesteps:
                model.unet(doubled, timestep, encoder_hidden_states=pair)
            model.vae.decode(chunk / model.vae_scaling_factor)


def measure_generation(model, model_name: str, variant: str, repeats: Repeats) -> dict:
    """Time ``generate`` against bare UNet and VAE calls for the same prompts, steps and batching."""
    from benchmark.generation import Sampling, generate, initial_latents, make_scheduler

    records = concept_for(model_name).load_prompts().records[: repeats.generation_prompts]
    prompts = [record.prompt for record in records]
    seeds = [record.seed for record in records]
    guidance = [record.guidance for record in records]
    sampling = Sampling(model.default_sampler, repeats.generation_steps or model.default_steps, model.resolution)
    batch_invariant = variant == "batch-invariant"
    batch = 1 if batch_invariant else len(prompts)

    def run_generate() -> None:
        generate(model, seeds, guidance, sampling, prompts=prompts, batch_size=batch, batch_invariant=batch_invariant)

    scheduler = make_scheduler(model, sampling.sampler)
    scheduler.set_timesteps(sampling.steps)
    with torch.no_grad():
        states = model.encode_prompts(prompts[:1]).expand(batch, -1, -1)
    latents = initial_latents(model, seeds, sampling.resolution).to(model.device, model.dtype)

    seconds, bare = alternating_medians(
        run_generate, lambda: bare_generation(model, states, latents, scheduler.timesteps, batch),
        repeats.generation_repeats)
    images_per_second, bare_per_second = len(prompts) / seconds, len(prompts) / bare
    ratio = images_per_second / bare_per_second
    return {
        "kind": "generation",
        "name": variant,
        "status": "measured",
        "seconds": seconds / len(prompts),
        "baseline_seconds": bare / len(prompts),
        "baseline": "bare UNet + VAE-decoder calls",
        "images_per_second": images_per_second,
        "baseline_images_per_second": bare_per_second,
        "ratio": ratio,
        "target": f">= {THROUGHPUT_TARGET}",
        "passed": ratio >= THROUGHPUT_TARGET,
        "details": {
            "how": (f"generate() of {len(prompts)} prompts, {batch} per UNet call, {sampling.sampler} "
                    f"{sampling.steps} steps at {sampling.resolution} px; the bare loop makes the same UNet "
                    "calls (conditional and unconditional together) and VAE decodes"),
            "notes": [],
        },
    }


# ----------------------------------------------------------------------------------------
# Evaluators


def synthetic_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def throughput_row(name: str, images: int, plugin: Callable[[], Any], raw: Callable[[], Any], repeats: Repeats,
                   how: str, details: dict | None = None) -> dict:
    seconds, raw_seconds = alternating_medians(plugin, raw, repeats.evaluator_repeats)
    ratio = raw_seconds / seconds
    return {
        "kind": "evaluator",
        "name": name,
        "status": "measured",
        "seconds": seconds / images,
        "baseline_seconds": raw_seconds / images,
        "baseline": "raw model call",
        "images_per_second": images / seconds,
        "baseline_images_per_second": images / raw_seconds,
        "ratio": ratio,
        "target": f">= {THROUGHPUT_TARGET}",
        "passed": ratio >= THROUGHPUT_TARGET,
        "details": {"how": how, **(details or {}), "notes": []},
    }


def measure_world_classifier(repeats: Repeats) -> dict:
    from evaluators.world_classifier import WorldClassifier, WorldClassifierConfig

    evaluator = WorldClassifier(WorldClassifierConfig(attribute="shape", target="circle"))
    images = synthetic_images(repeats.evaluator_images, 32)
    tensors = [torch.from_numpy(image[None]).permute(0, 3, 1, 2).float() / 255.0 for image in images]

    def raw() -> None:
        with torch.no_grad():
            for tensor in tensors:
                evaluator.model(tensor)

    how = f"score() of {images_phrase(len(images), 32)}, one per forward pass, against model(tensor) per image"
    return throughput_row("world-classifier", len(images), lambda: evaluator.score(images), raw, repeats, how)


def measure_nudenet(repeats: Repeats) -> dict:
    from evaluators.nudenet import NudeNetEvaluator

    evaluator = NudeNetEvaluator()
    count = max(1, repeats.evaluator_images // 4)
    images = synthetic_images(count, 512)
    bgr = [np.ascontiguousarray(image[..., ::-1]) for image in images]
    detector = evaluator.detector

    def raw() -> None:
        for image in bgr:
            detector.detect(image)

    how = (f"score() of {images_phrase(count, 512)} against NudeDetector.detect per image (nudenet's own "
           "preprocessing, ONNX session and box decoding); onnxruntime picks its own thread count")
    return throughput_row("nudenet", count, lambda: evaluator.score(images), raw, repeats, how,
                          {"detector": str(evaluator.model_path)})


def construct_evaluator(name: str, **overrides):
    """Build an evaluator with its default settings, raising FileNotFoundError when its weights are missing."""
    from benchmark.registry import EVALUATORS

    evaluator_class = EVALUATORS.get(name)
    if name == "object-classifier":
        overrides = {"class_id": 497, **overrides}
    return evaluator_class(evaluator_class.Config(**overrides))


# Evaluators that can run on random weights of their architecture when the real weights are missing.
RANDOM_WEIGHT_EVALUATORS = ("clip-score", "object-classifier", "style-classifier")


def save_random_weights(name: str, folder: Path) -> dict:
    """Save a random-weight model of the evaluator's architecture under ``folder``; return its config overrides.

    Throughput does not depend on the weight values, so these stand in for weights that are not
    on this machine. Each is written in the format the evaluator reads from a local path.
    """
    torch.manual_seed(0)
    if name == "clip-score":
        import open_clip
        from safetensors.torch import save_file

        model = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
        path = folder / "open_clip_model.safetensors"
        save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
        return {"weights": str(path)}
    if name == "object-classifier":
        # microsoft/resnet-50: transformers' ResNetConfig defaults are ResNet-50, with its image processor.
        from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

        labels = {index: f"class {index}" for index in range(1000)}
        model = ResNetForImageClassification(ResNetConfig(num_labels=1000, id2label=labels,
                                                          label2id={v: k for k, v in labels.items()}))
        processor = ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875, resample=3)
    elif name == "style-classifier":
        # UnlearnDiffAtk's checkpoint-2800: a ViT-base (patch 16, 224 px) with 129 WikiArt artist labels.
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        labels = {0: "vincent-van-gogh", **{index: f"artist-{index}" for index in range(1, 129)}}
        model = ViTForImageClassification(ViTConfig(num_labels=129, id2label=labels,
                                                    label2id={v: k for k, v in labels.items()}))
        processor = ViTImageProcessor()
    else:
        raise ValueError(f"no random-weight stand-in for evaluator {name}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    key = "model_path" if name == "style-classifier" else "weights"
    return {key: str(folder)}


def measure_weighted_evaluator(name: str, repeats: Repeats) -> dict:
    """Measure an evaluator whose weights are not shipped, or return a skipped row with the reason.

    When the real weights of clip-score, object-classifier or style-classifier are missing, the
    evaluator loads random weights of the same architecture from a temporary folder instead, and
    the row is marked random weights.
    """
    try:
        evaluator = construct_evaluator(name)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        if name not in RANDOM_WEIGHT_EVALUATORS:
            return skipped_row("evaluator", name, f"weights not available locally: {error}")
        if repeats is MODES["smoke"]:
            # Building and loading the stand-in takes seconds, which the smoke test cannot spare.
            return skipped_row("evaluator", name, "weights not available locally, and random-weight stand-ins "
                               f"are measured in quick and full modes only: {error}")
        with tempfile.TemporaryDirectory() as folder:
            evaluator = construct_evaluator(name, **save_random_weights(name, Path(folder)))
            row = measure_evaluator(name, evaluator, repeats)
        row["weights"] = "random"
        row["details"]["how"] += (f". Random weights of the same architecture stand in, because the real ones "
                                  f"are missing ({short_reason(str(error), 120)})")
        return row
    return measure_evaluator(name, evaluator, repeats)


def measure_evaluator(name: str, evaluator, repeats: Repeats) -> dict:
    """Time a constructed evaluator against its raw model call on preprocessed inputs."""
    count = max(1, repeats.evaluator_images // 4)
    images = synthetic_images(count, 512)
    if name == "clip-score":
        from PIL import Image

        captions = ["a photo of a church"] * count
        pixels = torch.stack([evaluator.preprocess(Image.fromarray(image)) for image in images])
        tokens = evaluator.tokenizer(captions)

        def raw() -> None:
            with torch.no_grad():
                evaluator.model.encode_image(pixels.to(evaluator.device), normalize=True)
                evaluator.model.encode_text(tokens.to(evaluator.device), normalize=True)

        return throughput_row(name, count, lambda: evaluator.similarities(images, captions), raw, repeats,
                              "similarities() against encode_image and encode_text on preprocessed inputs")
    if name == "fid":
        from evaluators.fid import inception_input

        batch = torch.from_numpy(np.stack([inception_input(image) for image in images])).permute(0, 3, 1, 2)

        def raw() -> None:
            with torch.no_grad():
                evaluator.extractor(batch.contiguous().to(evaluator.device))

        return throughput_row(name, count, lambda: evaluator.features(images), raw, repeats,
                              "features() against the Inception extractor on preprocessed inputs")

    from PIL import Image

    # The raw calls use the evaluator's own batch size (one image per forward pass by default).
    size = evaluator.config.batch_size
    chunks = [images[start : start + size] for start in range(0, count, size)]
    if getattr(evaluator, "processor", None) is not None:
        inputs = [evaluator.processor(images=[Image.fromarray(image) for image in chunk], return_tensors="pt")
                  for chunk in chunks]

        def raw() -> None:
            with torch.no_grad():
                for chunk_inputs in inputs:
                    evaluator.model(**chunk_inputs.to(evaluator.device))
    else:
        batches = [torch.stack([evaluator.transform(Image.fromarray(image)) for image in chunk]) for chunk in chunks]

        def raw() -> None:
            with torch.no_grad():
                for batch in batches:
                    evaluator.model(batch.to(evaluator.device))

    targets = [{"artist": "vincent van gogh"}] * count
    return throughput_row(name, count, lambda: evaluator.score(images, targets), raw, repeats,
                          f"score() of {images_phrase(count, 512)} against forward passes of the classifier on "
                          f"preprocessed inputs. Each pass takes {count_noun(size, 'image')}, as the evaluator's "
                          "passes do")


# ----------------------------------------------------------------------------------------
# Tasks: one measurement each, run in a subprocess or in this process


def skipped_row(kind: str, name: str, reason: str) -> dict:
    return {"kind": kind, "name": name, "status": "skipped", "reason": reason, "passed": None, "details": {}}


def run_task(task: dict) -> list[dict]:
    """Run one measurement task and return its rows, each with this process's peak memory."""
    torch.set_num_threads(1)
    mode, kind, name = task["mode"], task["kind"], task["name"]
    model_name = task.get("model")
    started = time.perf_counter()

    if kind == "evaluator":
        repeats = MODES[mode]
        if name == "world-classifier":
            rows = [measure_world_classifier(repeats)]
        elif name == "nudenet":
            rows = [measure_nudenet(repeats)]
        else:
            rows = [measure_weighted_evaluator(name, repeats)]
    else:
        label = model_name
        repeats = repeats_for(mode, label)
        model_name, pixels = split_model_label(label)
        model = load_benchmark_model(model_name, pixels or task["resolution"])
        if kind == "attack" and name == "unlearndiffatk":
            rows = [measure_unlearndiffatk(model, model_name, repeats)]
        elif kind == "attack" and name in ("p4d-n", "p4d-k"):
            rows = [measure_p4d(model, model_name, name, repeats)]
        elif kind == "attack" and name == "cce":
            rows = [measure_cce(model, model_name, repeats)]
        elif kind == "defense":
            rows = [measure_defense(model, model_name, name, repeats)]
        elif kind == "generation":
            rows = [measure_generation(model, model_name, name, repeats)]
        elif kind == "batched-attack" and name == "unlearndiffatk":
            rows = [measure_batched_unlearndiffatk(model, model_name, repeats)]
        else:
            raise ValueError(f"unknown benchmark task {kind}/{name}")

    for row in rows:
        row["model"] = task.get("model")
        row["peak_rss_mib"] = peak_rss_mib()
        row["task_seconds"] = time.perf_counter() - started
    return rows


def run_task_in_subprocess(task: dict) -> list[dict]:
    """Run a task in a fresh Python process, so that ru_maxrss is this measurement's own."""
    with tempfile.TemporaryDirectory() as folder:
        task_file, result_file = Path(folder) / "task.json", Path(folder) / "rows.json"
        task_file.write_text(json.dumps({**task, "result_file": str(result_file)}))
        completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(task_file)],
                                   cwd=REPO, capture_output=True, text=True)
        if completed.returncode != 0 or not result_file.exists():
            message = (completed.stderr or completed.stdout).strip().splitlines()[-12:]
            raise RuntimeError(f"worker exited with status {completed.returncode}: " + "\n".join(message))
        return json.loads(result_file.read_text())


def worker_main(task_file: str) -> int:
    task = json.loads(Path(task_file).read_text())
    rows = run_task(task)
    Path(task["result_file"]).write_text(json.dumps(rows))
    return 0


# ----------------------------------------------------------------------------------------
# The whole default run


def measure_default_run(output: Path) -> dict:
    """Run ``python -m benchmark run --defense advunlearn --attack unlearndiffatk`` from an empty cache.

    CPU seconds come from ``getrusage(RUSAGE_CHILDREN)`` before and after. Peak memory comes
    from ``wait4`` for this child alone, because RUSAGE_CHILDREN reports the largest of all
    children, the measurement workers included.
    """
    command = [sys.executable, "-m", "benchmark", "run", "--defense", "advunlearn", "--attack", "unlearndiffatk",
               "--no-progress", "--output", str(output / "runs")]
    environment = {**os.environ, "ERASURE_BENCH_CACHE": str(output / "cache")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(output / "stdout.txt", "w+") as stdout, open(output / "stderr.txt", "w+") as stderr:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        printed, errors = stdout.read(), stderr.read()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[1:])}` exited with status {process.returncode}: {errors[-2000:]}")

    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    run_dir = Path(printed.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "kind": "run",
        "name": "advunlearn x unlearndiffatk",
        "model": "world",
        "status": "measured",
        "seconds": wall,
        "baseline_seconds": RUN_TARGET_SECONDS,
        "baseline": "target",
        "ratio": wall / RUN_TARGET_SECONDS,
        "target": f"< {RUN_TARGET_SECONDS:.0f} s",
        "passed": wall < RUN_TARGET_SECONDS,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "details": {
            "how": "python -m benchmark run --defense advunlearn --attack unlearndiffatk, empty erasure cache",
            "cpu_seconds": cpu,
            "stage_seconds": summary.get("seconds", {}),
            "asr": summary.get("asr"),
            "pre_attack_asr": summary.get("pre_attack_asr"),
            "notes": [],
        },
    }


# ----------------------------------------------------------------------------------------
# Plan, table and page


def plan_tasks(models: tuple[str, ...], mode: str, resolution: int, only: set[str]) -> list[dict]:
    """List the measurement tasks, keeping only those named ``kind/name`` in ``only`` unless it is empty."""
    tasks = []
    for model_name in models:
        _, pixels = split_model_label(model_name)
        for kind, names in (("attack", ATTACKS), ("defense", DEFENSES), ("generation", GENERATION_VARIANTS)):
            for name in names:
                if pixels is not None and (kind, name) not in REFERENCE_RESOLUTION_TASKS:
                    continue
                tasks.append({"mode": mode, "kind": kind, "name": name, "model": model_name, "resolution": resolution})
        if not model_name.startswith(FULL_SIZE_MODEL):
            # On the full-size model 8 prompts at once would take minutes per run.
            for name in BATCHED_ATTACKS:
                tasks.append({"mode": mode, "kind": "batched-attack", "name": name, "model": model_name,
                              "resolution": resolution})
    for name in EVALUATORS:
        tasks.append({"mode": mode, "kind": "evaluator", "name": name, "model": None})
    if not only:
        return tasks

    known = {f"{task['kind']}/{task['name']}" for task in tasks} | {"run/default"}
    unknown = only - known
    if unknown:
        raise SystemExit(f"--only: unknown measurement {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))}")
    return [task for task in tasks if f"{task['kind']}/{task['name']}" in only]


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.1f} ms"


TABLE_HEADER = ("| model | measurement | measured | baseline | ratio | ratio with text encoder | target | result "
                "| peak RSS |")


def short_reason(reason: str, limit: int = 80) -> str:
    """Return the reason's first clause for a table cell, cut at a word boundary to at most ``limit`` characters."""
    first = reason.split(";")[0].split(". ")[0].replace("|", "/").replace("\n", " ")
    if len(first) <= limit:
        return first
    # Keep room for the ellipsis. A first word longer than the limit is cut inside the word.
    cut = first[: limit - 1]
    if first[limit - 1] != " " and " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,:") + "…"


def table_lines(rows: list[dict], full_reasons: bool = True) -> list[str]:
    lines = [TABLE_HEADER, "|---|---|---:|---:|---:|---:|---|---|---:|"]
    for row in rows:
        measurement = f"{row['kind']} {row['name']}" + (" (random weights)" if row.get("weights") == "random" else "")
        if row["status"] != "measured":
            reason = row.get("reason", "") if full_reasons else short_reason(row.get("reason", ""))
            lines.append(f"| {row.get('model') or '-'} | {measurement} | - | - | - | - | {row.get('target', '-')} | "
                         f"{row['status']}: {reason} | - |")
            continue
        if "images_per_second" in row:
            time_text = f"{row['images_per_second']:.2f} img/s"
            baseline_text = f"{row['baseline_images_per_second']:.2f} img/s"
        elif "prompts_per_second" in row:
            time_text = f"{row['prompts_per_second']:.2f} prompts/s"
            baseline_text = f"{row['baseline_prompts_per_second']:.2f} prompts/s"
        else:
            time_text, baseline_text = format_seconds(row["seconds"]), format_seconds(row["baseline_seconds"])
        result = "pass" if row["passed"] else "MISS"
        with_text = row.get("details", {}).get("ratio_to_unet_and_text_encoder")
        with_text_text = f"{with_text:.2f}" if with_text is not None else "-"
        lines.append(f"| {row.get('model') or '-'} | {measurement} | {time_text} | {baseline_text} | "
                     f"{row['ratio']:.2f} | {with_text_text} | {row['target']} | {result} | "
                     f"{row['peak_rss_mib']:.0f} MiB |")
    return lines


def machine_description() -> dict:
    from benchmark.provenance import cpu_model

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": 1,
        "cuda": torch.cuda.is_available(),
    }


def method_notes(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["status"] != "measured" or row["kind"] not in ("attack", "defense"):
            continue
        details = row["details"]
        lines.append(f"- **{row_label(row)}** ({format_seconds(row['seconds'])}): "
                     f"{details['how']}. UNet passes per step: "
                     f"{details['unet_passes_per_step']}. Text-encoder passes per step: "
                     f"{details['text_encoder_passes_per_step']}; with them the floor is "
                     f"{format_seconds(row['baseline_seconds'] + details['text_encoder_floor_seconds'])} and the "
                     f"ratio {details['ratio_to_unet_and_text_encoder']:.2f}."
                     + notes_text(details["notes"]))
    return lines


def notes_text(notes: list[str]) -> str:
    """Join a row's notes as sentences, each starting with a capital letter."""
    return "".join(f" {note[0].upper() + note[1:].rstrip('.')}." for note in notes)


def row_label(row: dict) -> str:
    """Return "model kind name", or "kind name" for rows that use no generation model."""
    return " ".join(part for part in (row.get("model"), row["kind"], row["name"]) if part)


def other_notes(rows: list[dict]) -> list[str]:
    """List the whole run's CPU time and stages, and the full reason of every skipped or failed row."""
    lines = []
    for row in rows:
        if row["kind"] == "run" and row["status"] == "measured":
            details = row["details"]
            stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in sorted(details["stage_seconds"].items()))
            lines.append(f"- **{row['name']}** on the world: {row['seconds']:.0f} s wall, {details['cpu_seconds']:.0f} s "
                         f"CPU (user and system) of the child process. Stages: {stages}.")
        elif row["status"] != "measured":
            lines.append(f"- **{row_label(row)}** {row['status']}: {row['reason']}")
        elif row["kind"] in ("generation", "evaluator", "batched-attack"):
            lines.append(f"- **{row_label(row)}**: {row['details']['how']}."
                         + notes_text(row["details"]["notes"]))
    return lines


def smoke_note(models: list[str]) -> str:
    """Return the smoke page's warning that its numbers only check that the script runs."""
    models_text = "tiny-random, a tiny random-weight model," if models == ["tiny-random"] else ", ".join(models) + ","
    return (f"In smoke mode each number comes from one repeat on {models_text} so these numbers only check that the "
            "script runs, and their ratios and pass/MISS verdicts mean nothing.")


def attack_cost_paragraph(report: dict) -> str:
    """Explain the attack steps' work beyond their UNet passes, with only the sentences that the rows support.

    The default world's sentences need measured world attack rows, the full-size sentences need
    measured rows of that model, and the sentences about 512 pixels need rows at that resolution.
    """
    measured = [row for row in report["rows"] if row["status"] == "measured"]
    attack_models = {row["model"] for row in measured if row["kind"] == "attack"}
    full_size_attack = any(model.partition("@")[0] == FULL_SIZE_MODEL for model in attack_models)
    esd_u_models = {row["model"] for row in measured if (row["kind"], row["name"]) == ("defense", "esd-u")}
    at_reference = any(row.get("model") == FULL_SIZE_AT_REFERENCE for row in measured)
    sentences = []
    if attack_models:
        sentences.append(
            "Beyond its UNet passes, each attack step runs work that the reference methods run too. Every "
            "attack backpropagates through the text encoder, which is not a UNet pass. UnlearnDiffAtk samples "
            "k tokens from k x 49,408 distributions, takes the gradient of the one-hot rows (a k x width by "
            "width x 49,408 product) and projects the rows back onto the simplex. P4D searches all 49,408 "
            "unit-length token embeddings for each learned token.")
    if "world" in attack_models:
        sentences.append(
            "On the default world a forward and backward pass of the text encoder costs about a sixth of one of "
            f"the small UNet. So on the default world no attack step can come within {STEP_TARGET}x of its UNet "
            "passes alone, and the column with the text encoder shows how much of the rest is the method's own work.")
    if full_size_attack:
        sentences.append(
            "On the full-size architecture the text encoder's share shrinks as the resolution grows, because the "
            "UNet's cost grows with the latent size and the text encoder's does not.")
    if at_reference:
        sentences.append(f"The rows at {REFERENCE_RESOLUTION} pixels, SD v1.4's resolution, measure the steps as "
                         "they run there.")
    if any(model and model.partition("@")[0] == FULL_SIZE_MODEL for model in esd_u_models):
        both_resolutions = {FULL_SIZE_MODEL, FULL_SIZE_AT_REFERENCE} <= esd_u_models
        sentences.append(
            "ESD-u on the full-size model trains 813 M UNet parameters, and its Adam update, which reads and "
            "writes four tensors of that size, is part of the step but not a UNet pass. That update costs the "
            "same at every resolution"
            + (f", so it weighs on the step at {report['settings']['resolution']} pixels and hardly at "
               f"{REFERENCE_RESOLUTION}." if both_resolutions else "."))
    return " ".join(sentences)


# Static usage section at the end of the page. It states what main() and merge_reports() do.
USAGE_LINES = [
    "## Running the benchmarks",
    "",
    "Run these from the repository root. Every command writes `benchmarks.md` and `benchmarks.json` into "
    "`docs/` unless `--output-dir` names another folder, so a run without `--output-dir` replaces this page.",
    "",
    "```sh",
    "# Full mode: the default world, sd-v1-4-random at 128 pixels, its method steps at 512 pixels and a",
    "# whole default run. Rewrites docs/benchmarks.md and docs/benchmarks.json; takes hours on a 2-core CPU.",
    "python benchmarks/run_benchmarks.py",
    "",
    "# Quick mode: the default world only, fewer repeats, no whole run; a few minutes.",
    "python benchmarks/run_benchmarks.py --quick --output-dir /tmp/bench-quick",
    "",
    "# Smoke mode: one repeat of everything on tiny-random, in this process; only checks that the script runs.",
    "python benchmarks/run_benchmarks.py --smoke --output-dir /tmp/bench-smoke",
    "",
    "# Measure one row again (ESD-u at 512 pixels) into a copy of this page.",
    "mkdir -p /tmp/bench && cp docs/benchmarks.json /tmp/bench/",
    "python benchmarks/run_benchmarks.py --model sd-v1-4-random@512 --only defense/esd-u --output-dir /tmp/bench",
    "",
    "# Measure nothing: rewrite benchmarks.md from the benchmarks.json in --output-dir (default docs/).",
    "python benchmarks/run_benchmarks.py --render-only",
    "```",
    "",
    "`--only` takes comma-separated measurements as `kind/name`, such as `attack/p4d-n,defense/fmn` or "
    "`run/default`. `--model` takes comma-separated models: `world`, `tiny-random`, `sd-v1-4-random`, or "
    f"`{FULL_SIZE_AT_REFERENCE}` for the full-size architecture at {REFERENCE_RESOLUTION} pixels. Without "
    "`--model`, smoke mode measures tiny-random, quick mode world, and full mode "
    f"{', '.join(DEFAULT_MODELS['full'])}.",
    "",
    "When the output folder already holds a `benchmarks.json`, an `--only` run merges into it. Each measured row "
    "replaces the row of the same kind, name and model, a row that has no match is added, and every other row "
    "stays. The settings stay those of the earlier run, and the paragraph about the machine lists the update "
    "and its date. The earlier file must come from the same mode, or the script stops with an error before it measures. Without an "
    "earlier `benchmarks.json`, the page holds only the rows just measured. So the example above leaves in "
    "`/tmp/bench` the whole page with its ESD-u row at 512 pixels measured again, and the same command "
    "without `--output-dir` updates `docs/` in place.",
    "",
]


def write_page(report: dict, output_dir: Path) -> None:
    """Write benchmarks.md (the generated page) and benchmarks.json into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmarks.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

    machine = report["machine"]
    settings = report["settings"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/run_benchmarks.py"
        + {"quick": " --quick", "smoke": " --smoke", "full": ""}[settings["mode"]]
        + "`; do not edit by hand. The same numbers are in `benchmarks.json`.",
        "",
        *([smoke_note(settings["models"]), ""] if settings["mode"] == "smoke" else []),
        f"Measured on {report['date']} on {machine['platform']} ({machine['processor']}, "
        + (f"{machine['cpu']} with torch's {machine['cpu_capability']} kernels, " if machine.get("cpu") else "")
        + f"{machine['cpu_count']} CPUs), Python {machine['python']}, torch {machine['torch']}, with one torch "
        "thread for every measurement. Other jobs shared the machine, so absolute times are noisy. Each ratio "
        "compares numbers measured in the same process, and a step's floor is timed right after the step."
        + "".join(f" {'Rows' if ',' in update['only'] else 'Row'} "
                  f"{', '.join(f'`{name}`' for name in update['only'].split(','))}"
                  + (f" of {', '.join(update['models'])}" if update.get("models") else "")
                  + f" {'were' if ',' in update['only'] else 'was'} measured again on {update['date']} with `--only`."
                  for update in report.get("updates", [])),
        "",
        f"Mode `{settings['mode']}`: models {', '.join(settings['models'])}. "
        + (f"The full-size SD v1.4 architecture (random weights) runs at {settings['resolution']} x "
           f"{settings['resolution']} pixels ({settings['resolution'] // 8} x {settings['resolution'] // 8} "
           "latents) instead of 512, with fewer repeats, and generation uses 4 sampler steps. "
           if FULL_SIZE_MODEL in settings["models"] else "")
        + (f"Rows of `{FULL_SIZE_AT_REFERENCE}` measure method steps on the same architecture "
           f"at {REFERENCE_RESOLUTION} x {REFERENCE_RESOLUTION} pixels, SD v1.4's own resolution, with two timed "
           "steps and one floor sample per pass kind. "
           if any(row.get("model") == FULL_SIZE_AT_REFERENCE for row in report["rows"]) else "")
        + "Every model uses the default world's method budgets (`benchmark/world/budgets.yaml`).",
        "",
        "## Results",
        "",
        "Method rows: time of one step through the plug-in's own code against the UNet passes that step "
        "makes, each timed alone at the same shapes and with the same parameters requiring gradients "
        f"(target <= {STEP_TARGET}); the next column adds the text-encoder passes of the step to that floor. "
        "Generation and evaluator rows: images per second against bare model "
        f"calls (target >= {THROUGHPUT_TARGET} of their throughput); evaluator rows marked random weights "
        "load random weights of the real architecture, because the real weights are not on the machine. "
        f"Batched-attack rows: prompts per second of one batched run against sequential runs (target >= "
        f"{BATCH_TARGET}). Peak RSS is the measuring process's ru_maxrss, model loading included."
        + (" A skipped or failed row shows the start of its reason, and the notes below the table give it in full."
           if any(row["status"] != "measured" for row in report["rows"]) else ""),
        "",
        *table_lines(report["rows"], full_reasons=False),
        "",
        "## How each step was measured",
        "",
        "A step's ratio is the median over its timed steps of the step's time over the time of that "
        "step's own UNet passes, which are timed right after it. The floor with the text encoder "
        "adds the text-encoder passes the step makes, timed the same way.",
        "",
        *method_notes(report["rows"]),
        "",
        *([attack_costs, ""] if (attack_costs := attack_cost_paragraph(report)) else []),
        "## Generation, evaluators, batched attacks, the whole run and skipped rows",
        "",
        *other_notes(report["rows"]),
        "",
        "## Attention and speed options",
        "",
        "The UNets load with diffusers' default attention processor, `AttnProcessor2_0`, which calls "
        "`torch.nn.functional.scaled_dot_product_attention` (checked by `tests/test_generation_options.py`). "
        "`generation.precision` (`bf16` or `fp16` autocast, meant for CUDA) and `generation.compile` "
        "(torch.compile of the UNet) are off in these measurements.",
        "",
        *USAGE_LINES,
    ]
    (output_dir / "benchmarks.md").write_text("\n".join(lines))


def measure_task(task: dict, in_process: bool) -> tuple[list[dict], bool]:
    """Run one task and return its rows and whether it failed. A failure gives a "failed" row with the error."""
    label = f"{task.get('model') or '-'} {task['kind']} {task['name']}"
    print(f"measuring {label} ...", file=sys.stderr, flush=True)
    try:
        return (run_task(task) if in_process else run_task_in_subprocess(task)), False
    except Exception as error:
        if in_process:
            traceback.print_exc()
        row = {**skipped_row(task["kind"], task["name"], f"{type(error).__name__}: {error}"),
               "status": "failed", "model": task.get("model")}
        return [row], True


def default_run_row(mode: str, skip: bool) -> tuple[dict, bool]:
    """Measure the whole default run in full mode, or return a skipped row with the reason."""
    name = "advunlearn x unlearndiffatk"
    if mode != "full" or skip:
        reason = "measured in full mode only" if mode != "full" else "--skip-run was given"
        return {**skipped_row("run", name, reason), "model": "world", "target": f"< {RUN_TARGET_SECONDS:.0f} s"}, False

    print("measuring the default run ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as folder:
        try:
            return measure_default_run(Path(folder)), False
        except Exception as error:
            return {**skipped_row("run", name, f"{type(error).__name__}: {error}"), "status": "failed",
                    "model": "world"}, True


def run_all(args: argparse.Namespace) -> dict:
    models = tuple(args.model.split(",")) if args.model else DEFAULT_MODELS[args.mode]
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    rows, failures = [], 0
    for task in plan_tasks(models, args.mode, args.resolution, only):
        new_rows, failed = measure_task(task, in_process=args.mode == "smoke")
        rows.extend(new_rows)
        failures += failed
    if not only or "run/default" in only:
        row, failed = default_run_row(args.mode, args.skip_run)
        rows.append(row)
        failures += failed

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "settings": {"mode": args.mode, "models": list(models), "resolution": args.resolution,
                     "repeats": {model_name: dataclasses.asdict(repeats_for(args.mode, model_name))
                                 for model_name in models}},
        "rows": rows,
        "failures": failures,
    }


def row_key(row: dict) -> tuple:
    return row["kind"], row["name"], row.get("model")


def check_same_mode(previous: dict, mode: str) -> None:
    """Stop unless an ``--only`` run of ``mode`` can be merged into the report ``previous``."""
    if previous["settings"]["mode"] != mode:
        raise SystemExit(f"--only: the existing benchmarks.json was measured in mode "
                         f"{previous['settings']['mode']!r}, this run in {mode!r}; "
                         "rerun with the same mode or use another --output-dir")


def merge_reports(previous: dict, update: dict, only: str) -> dict:
    """Put the rows of an ``--only`` run into the previous report, keeping every other row.

    A row replaces the previous row of the same kind, name and model. A new row goes after the
    last previous row of its model, and an evaluator row, which has no model, before the run row.
    """
    check_same_mode(previous, update["settings"]["mode"])
    rows = list(previous["rows"])
    for row in update["rows"]:
        keys = [row_key(existing) for existing in rows]
        if row_key(row) in keys:
            rows[keys.index(row_key(row))] = row
            continue
        same_model = [index for index, existing in enumerate(rows)
                      if existing.get("model") == row.get("model") and existing["kind"] != "run"]
        position = same_model[-1] + 1 if same_model else len([r for r in rows if r["kind"] != "run"])
        rows.insert(position, row)
    updates = list(previous.get("updates", []))
    updates.append({"date": update["date"], "only": only, "models": update["settings"]["models"],
                    "machine": update["machine"]})
    return {**previous, "rows": rows, "updates": updates,
            "failures": sum(row["status"] == "failed" for row in rows)}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", dest="mode", action="store_const", const="quick",
                       help="the default world only, fewer repeats, no whole run (a few minutes on a 2-core CPU)")
    modes.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                       help="one repeat of everything in this process; checks the script, numbers are not meaningful")
    parser.set_defaults(mode="full")
    parser.add_argument("--model", default="",
                        help="comma-separated models (world, tiny-random, sd-v1-4-random, or sd-v1-4-random@512 "
                             "for 512 pixels); default: world in --quick, tiny-random in --smoke, world, "
                             "sd-v1-4-random and sd-v1-4-random@512 otherwise")
    parser.add_argument("--resolution", type=int, default=128,
                        help="image side in pixels for sd-v1-4-random (default 128, i.e. 16 x 16 latents)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "docs",
                        help="folder for benchmarks.md and benchmarks.json (default: docs/)")
    parser.add_argument("--skip-run", action="store_true", help="leave out the whole default run in full mode")
    parser.add_argument("--only", default="",
                        help="comma-separated measurements to run, as kind/name (e.g. attack/p4d-n,defense/fmn, "
                             "run/default); default: all")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing; rewrite benchmarks.md from the benchmarks.json in --output-dir")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.resolution % 64:
        raise SystemExit(f"--resolution {args.resolution} is invalid: it must be a multiple of 64, because "
                         "the SD UNet halves the latents three times")
    torch.set_num_threads(1)

    if args.render_only:
        source = args.output_dir / "benchmarks.json"
        if not source.is_file():
            raise SystemExit(f"--render-only: {source} not found; run the benchmarks first")
        report = json.loads(source.read_text())
        write_page(report, args.output_dir)
        print(f"wrote {args.output_dir / 'benchmarks.md'} from {source}", file=sys.stderr)
        return 0

    source = args.output_dir / "benchmarks.json"
    if args.only.strip() and source.is_file():
        # Stop before measuring, not after, if the rows cannot be merged.
        check_same_mode(json.loads(source.read_text()), args.mode)

    report = run_all(args)
    print("\n".join(table_lines(report["rows"])))
    failures = report["failures"]
    if args.only.strip() and source.is_file():
        # Keep the rows of the earlier run that this one did not measure.
        report = merge_reports(json.loads(source.read_text()), report, args.only)
    write_page(report, args.output_dir)
    print(f"wrote {args.output_dir / 'benchmarks.md'} and {source}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
