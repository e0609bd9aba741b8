"""Conformance suite that every registered defense and attack, and defenses/template.py, must pass.

The plug-ins are read from the registries when the tests are collected, so a new method is
checked without editing this file:

- interface: base class, ``name`` equal to the registered name, ``version``, a docstring, a
  documented ``Config`` dataclass whose every field has a default;
- config round trip: ``build_config(config_to_dict(default)) == default``, also through YAML;
- one-step run: ``python -m benchmark run --model tiny-random`` with the method's budget cut to
  one step by the overrides in ``ONE_STEP``;
- determinism: a second one-step run with an empty erasure cache gives the same erased
  weights, records and images.

A method missing from ``ONE_STEP`` fails ``test_one_step_override_listed`` and its run tests
are skipped with that reason; add its entry below.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from benchmark.cli import main
from benchmark.config import build_config, config_to_dict
from benchmark.paths import CACHE_VARIABLE
from benchmark.plugins import Attack, Defense
from benchmark.registry import ATTACKS, DEFENSES, import_object

TEMPLATE = ("template", "defenses.template:TemplateDefense")
REGISTRIES = {"defense": DEFENSES, "attack": ATTACKS}
BASE_CLASSES = {"defense": Defense, "attack": Attack}
ENTRY_METHODS = {"defense": "erase", "attack": "attack"}


def _checkpoint_file(directory: Path) -> str:
    """A UNet state dict of the tiny random model with one weight changed, for the checkpoint defense."""
    from benchmark.models.checkpoints import save_state_dict
    from benchmark.models.loading import build_tiny_model

    state = {name: tensor.clone() for name, tensor in build_tiny_model(seed=0).unet.state_dict().items()}
    name = sorted(state)[0]
    state[name] = state[name] + 0.01
    path = directory / "erased-unet.safetensors"
    save_state_dict(state, path)
    return str(path)


# Config values that cut each method to about one optimisation step on the tiny random model.
# A callable value is called with a scratch folder and returns the value (e.g. a file it wrote).
ONE_STEP = {
    ("defense", "none"): {},
    ("defense", "esd-x"): {"iterations": 1, "ddim_steps": 2},
    ("defense", "esd-u"): {"iterations": 1, "ddim_steps": 2},
    ("defense", "esd-full"): {"iterations": 1, "ddim_steps": 2},
    ("defense", "fmn"): {"steps": 1, "num_images": 1, "image_steps": 2, "ti_steps": 1},
    ("defense", "advunlearn"): {"iterations": 1, "warmup_iterations": 0, "ddim_steps": 2, "attack_steps": 1,
                                "retain_batch": 1},
    ("defense", "checkpoint"): {"path": _checkpoint_file, "component": "unet"},
    ("defense", "template"): {"iterations": 1},
    ("attack", "none"): {},
    ("attack", "unlearndiffatk"): {"timesteps": 1, "steps_per_timestep": 1, "target_steps": 2},
    ("attack", "p4d-n"): {"iterations": 1, "eval_every": 1, "target_candidates": 1, "target_steps": 2,
                          "eval_steps": 2, "selection": "evaluator", "prompt_length": 2},
    ("attack", "p4d-k"): {"iterations": 1, "eval_every": 1, "target_candidates": 1, "target_steps": 2,
                          "eval_steps": 2, "selection": "evaluator"},
    ("attack", "cce"): {"num_train_images": 1, "image_steps": 2, "train_batch_size": 1,
                        "gradient_accumulation_steps": 1, "max_train_steps": 1},
}


def _plugin_cases() -> list:
    cases = [pytest.param(kind, name, id=f"{kind}-{name}")
             for kind, registry in REGISTRIES.items() for name in registry.names()]
    if TEMPLATE[0] not in DEFENSES.names():
        cases.append(pytest.param("defense", TEMPLATE[0], id=f"defense-{TEMPLATE[0]}"))
    return cases


PLUGINS = _plugin_cases()


@pytest.fixture
def template_registered():
    """Register the template defense for the test; it is not registered by default."""
    added = TEMPLATE[0] not in DEFENSES
    if added:
        DEFENSES.register(TEMPLATE[0], TEMPLATE[1])
    yield
    if added:
        DEFENSES.unregister(TEMPLATE[0])


def _load(kind: str, name: str):
    if kind == "defense" and name == TEMPLATE[0] and name not in DEFENSES:
        return import_object(TEMPLATE[1])
    return REGISTRIES[kind].get(name)


# ----------------------------------------------------------------------------------------
# Interface and config


@pytest.mark.parametrize(("kind", "name"), PLUGINS)
def test_interface(kind, name):
    plugin = _load(kind, name)

    assert isinstance(plugin, type) and issubclass(plugin, BASE_CLASSES[kind]), \
        f"{kind} {name} must be a subclass of {BASE_CLASSES[kind].__name__}"
    assert plugin.name == name, f"{kind} {name}: class attribute name is {plugin.name!r}, not the registered name"
    assert isinstance(plugin.version, str) and plugin.version, f"{kind} {name}: version must be a non-empty string"
    assert (plugin.__doc__ or "").strip(), f"{kind} {name}: the class needs a docstring (`benchmark list` shows it)"
    method = ENTRY_METHODS[kind]
    assert getattr(plugin, method) is not getattr(BASE_CLASSES[kind], method), \
        f"{kind} {name}: {method}() is not implemented"


@pytest.mark.parametrize(("kind", "name"), PLUGINS)
def test_config_has_defaults_and_docstring(kind, name):
    config_class = _load(kind, name).Config

    assert dataclasses.is_dataclass(config_class), f"{kind} {name}: Config must be a dataclass"
    for item in dataclasses.fields(config_class):
        has_default = item.default is not dataclasses.MISSING or item.default_factory is not dataclasses.MISSING
        assert has_default, f"{kind} {name}: Config field {item.name} has no default"
    # dataclass() writes a signature such as "Config(a: int = 1)" into a class without a docstring.
    docstring = (config_class.__doc__ or "").strip()
    assert docstring and not docstring.startswith(config_class.__name__ + "("), \
        f"{kind} {name}: Config needs a docstring"


@pytest.mark.parametrize(("kind", "name"), PLUGINS)
def test_config_round_trip(kind, name):
    config_class = _load(kind, name).Config
    default = build_config(config_class, {}, kind)
    values = config_to_dict(default)

    assert build_config(config_class, values, kind) == default
    assert build_config(config_class, json.loads(json.dumps(values)), kind) == default
    assert build_config(config_class, yaml.safe_load(yaml.safe_dump(values)), kind) == default


# ----------------------------------------------------------------------------------------
# One-step runs on the tiny random model

_RUNS: dict[tuple, Path] = {}


def _one_step_overrides(kind: str, name: str, scratch: Path) -> list[str]:
    options = []
    for key, value in ONE_STEP[(kind, name)].items():
        if callable(value):
            value = value(scratch)
        text = value if isinstance(value, str) else json.dumps(value)
        options += ["--set", f"{kind}.{key}={text}"]
    return options


def _one_step_run(kind: str, name: str, copy: str, root: Path, monkeypatch) -> Path:
    """Run the method for one step (memoised per copy) and return the run folder."""
    key = (kind, name, copy)
    if key in _RUNS:
        return _RUNS[key]

    folder = root / f"{kind}-{name}-{copy}"
    # A failed earlier attempt leaves its folder behind; start clean so the real error shows again.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # A private erasure cache per copy, so the second run trains again instead of reusing the first's weights.
    monkeypatch.setenv(CACHE_VARIABLE, str(folder / "cache"))
    other = {"defense": "none", "attack": "none"}
    other[kind] = name
    argv = ["run", "--model", "tiny-random", "--defense", other["defense"], "--attack", other["attack"],
            "--set", "run.max_prompts=1", "--set", "run.utility=false", "--set", "run.grid_rows=0",
            "--no-progress", "--output", str(folder / "runs")] + _one_step_overrides(kind, name, folder)

    assert main(argv) == 0, f"{kind} {name}: the one-step run failed (python -m benchmark {' '.join(argv)})"
    (run_dir,) = (folder / "runs").iterdir()
    _RUNS[key] = run_dir
    return run_dir


def _require_override(kind: str, name: str) -> None:
    if (kind, name) not in ONE_STEP:
        pytest.skip(f"{kind} {name} has no one-step override in ONE_STEP; test_one_step_override_listed fails for it")


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("one-step")


@pytest.mark.parametrize(("kind", "name"), PLUGINS)
def test_one_step_override_listed(kind, name):
    if (kind, name) not in ONE_STEP:
        fields = ", ".join(item.name for item in dataclasses.fields(_load(kind, name).Config))
        pytest.fail(f"{kind} {name} has no entry in ONE_STEP (tests/test_conformance.py). Add the config values "
                    f"that cut it to one step; its Config fields are: {fields}")


@pytest.mark.parametrize(("kind", "name"), PLUGINS)
def test_one_step_run(kind, name, runs_root, monkeypatch, template_registered):
    _require_override(kind, name)
    run_dir = _one_step_run(kind, name, "first", runs_root, monkeypatch)

    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert summary[kind] == name
    assert summary["n_prompts"] == 1
    assert manifest["plan"][kind]["version"] == _load(kind, name).version
    for key, value in ONE_STEP[(kind, name)].items():
        if not callable(value):
            assert manifest["plan"][kind]["config"][key] == value, f"override {kind}.{key} was not applied"
    if kind == "defense" and name != "none":
        assert manifest["model"]["erased_sha256"] != manifest["model"]["base_sha256"], \
            f"defense {name}: one erasure step changed no weight"


def _comparable_records(run_dir: Path) -> list[dict]:
    """The run's records without timings, with the copy's own folder (cache paths in attack info) replaced."""
    copy_folder = run_dir.parent.parent
    text = (run_dir / "records.jsonl").read_text().replace(str(copy_folder), "<copy folder>")
    records = [json.loads(line) for line in text.splitlines()]
    for record in records:
        record["attack"].pop("seconds", None)
    return records


@pytest.mark.parametrize(("kind", "name"), PLUGINS)
def test_one_step_run_is_deterministic(kind, name, runs_root, monkeypatch, template_registered):
    _require_override(kind, name)
    first = _one_step_run(kind, name, "first", runs_root, monkeypatch)
    second = _one_step_run(kind, name, "second", runs_root, monkeypatch)

    first_manifest = json.loads((first / "manifest.json").read_text())
    second_manifest = json.loads((second / "manifest.json").read_text())
    assert first_manifest["model"]["erased_sha256"] == second_manifest["model"]["erased_sha256"], \
        f"{kind} {name}: two erasures with the same inputs gave different weights"
    assert _comparable_records(first) == _comparable_records(second), \
        f"{kind} {name}: two runs with the same inputs gave different records"
    for image in sorted((first / "images").iterdir()):
        assert image.read_bytes() == (second / "images" / image.name).read_bytes(), \
            f"{kind} {name}: image {image.name} differs between two identical runs"
