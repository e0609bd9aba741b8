"""One registry for every plug-in kind: attacks, defenses, evaluators, concepts and models.

Look up a plug-in by name; the module behind it is imported only then::

    from benchmark.registry import ATTACKS, DEFENSES

    attack_class = ATTACKS.get("none")
    print(DEFENSES.names())            # ['advunlearn', 'esd-u', ..., 'none']
    print(DEFENSES.describe("none"))   # the first line of the plug-in's docstring

Register a plug-in of your own in code, by "module:object" path or with a decorator::

    DEFENSES.register("my-defense", "my_package.defense:MyDefense")

    @ATTACKS.register("my-attack")
    class MyAttack(Attack):
        ...

or, from an installed package, with an entry point in its ``pyproject.toml``::

    [project.entry-points."robust_erasure_bench.defenses"]
    my-defense = "my_package.defense:MyDefense"

A plug-in that fails to import raises ``PluginLoadError`` with its name and the original error;
it is never skipped. An unknown name raises ``UnknownPluginError`` listing the valid names.

A family name stands for several plug-ins in the name lists of ``run`` and ``sweep``::

    DEFENSES.expand(["esd", "advunlearn"])             # ('esd-x', 'esd-u', 'advunlearn')
    ATTACKS.parse_list("none,p4d", "--attacks")        # ('none', 'p4d-n', 'p4d-k')
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

ENTRY_POINT_PREFIX = "robust_erasure_bench"


class PluginError(LookupError):
    """Base class of registry errors."""


class UnknownPluginError(PluginError):
    """No plug-in of that kind is registered under the requested name."""


class PluginLoadError(PluginError):
    """A registered plug-in could not be imported."""


@dataclass
class _Entry:
    target: Any
    origin: str
    loaded: Any = None


def import_object(path: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"invalid plug-in path {path!r}; expected 'package.module:object'")
    module = importlib.import_module(module_name)
    target = module
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


class Registry:
    """Plug-ins of one kind, by name, loaded lazily."""

    def __init__(self, kind: str, builtins: dict[str, str] | None = None, populate: str | None = None,
                 families: dict[str, tuple[str, ...]] | None = None) -> None:
        self.kind = kind
        # Family name -> the plug-ins it stands for in a name list, such as "p4d" for p4d-n and p4d-k.
        self.families = dict(families or {})
        # A module that registers this kind's built-in entries when imported (shipped concept files).
        self._populate = populate
        self.entry_point_group = f"{ENTRY_POINT_PREFIX}.{kind}s"
        self._entries: dict[str, _Entry] = {}
        self._entry_points_scanned = False
        for name, path in (builtins or {}).items():
            self._entries[name] = _Entry(path, "built-in")

    def register(self, name: str, target: Any = None, *, replace: bool = False) -> Any:
        """Register ``target`` (an object or a "module:object" path) under ``name``.

        Without ``target`` this returns a decorator.
        """
        if target is None:
            def decorator(obj: Any) -> Any:
                self.register(name, obj, replace=replace)
                return obj
            return decorator

        if name in self._entries and not replace:
            raise PluginError(f"{self.kind} {name!r} is already registered ({self._entries[name].origin})")
        self._entries[name] = _Entry(target, "code")
        return target

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _scan_entry_points(self) -> None:
        if self._entry_points_scanned:
            return
        self._entry_points_scanned = True
        if self._populate:
            importlib.import_module(self._populate)
        for entry_point in entry_points(group=self.entry_point_group):
            if entry_point.name in self._entries:
                continue
            origin = f"entry point of {entry_point.dist.name if entry_point.dist else 'an installed package'}"
            self._entries[entry_point.name] = _Entry(entry_point.value, origin)

    def rescan(self) -> None:
        """Look for entry points again, e.g. after installing a package in the same process."""
        self._entry_points_scanned = False

    def names(self) -> list[str]:
        self._scan_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._scan_entry_points()
        return name in self._entries

    def get(self, name: str) -> Any:
        """Return the plug-in registered as ``name``, importing it on first use."""
        self._scan_entry_points()
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownPluginError(self._unknown_message(name))

        if entry.loaded is None:
            if isinstance(entry.target, str):
                try:
                    entry.loaded = import_object(entry.target)
                except Exception as error:
                    raise PluginLoadError(
                        f"{self.kind} plug-in {name!r} ({entry.target}, {entry.origin}) failed to import: "
                        f"{type(error).__name__}: {error}"
                    ) from error
            else:
                entry.loaded = entry.target
        return entry.loaded

    def is_family(self, name: str) -> bool:
        """Return whether ``name`` is a family name. A registered plug-in of the same name takes precedence."""
        self._scan_entry_points()
        return name in self.families and name not in self._entries

    def closest(self, name: str) -> str | None:
        """Return the registered name closest to a misspelt ``name``, or None if none is close."""
        close = difflib.get_close_matches(name, self.names(), n=1)
        return close[0] if close else None

    def expand(self, names) -> tuple[str, ...]:
        """Replace each family name in ``names`` by its members, in order. Repeats are kept."""
        expanded: list[str] = []
        for name in names:
            expanded.extend(self.families[name] if self.is_family(name) else (name,))
        return tuple(expanded)

    def parse_list(self, value: str, option: str) -> tuple[str, ...]:
        """Split a comma-separated ``option`` value into plug-in names, with families expanded.

        An empty list and a name listed twice (also through a family) raise ``PluginError``.
        """
        names = [part.strip() for part in value.split(",") if part.strip()]
        if not names:
            families = f"; families: {', '.join(sorted(self.families))}" if self.families else ""
            raise PluginError(f"{option} is empty; pass one or more {self.kind} names separated by commas; "
                              f"available: {', '.join(self.names())}{families}")

        expanded = self.expand(names)
        repeated = sorted({name for name in expanded if expanded.count(name) > 1})
        if repeated:
            families = [f"{name} = {','.join(self.families[name])}" for name in names if self.is_family(name)]
            via = f" (after expanding {'; '.join(families)})" if families else ""
            raise PluginError(f"{option} lists {', '.join(repeated)} twice{via}; remove the repeated name")
        return expanded

    def describe(self, name: str) -> str:
        """Return the plug-in's one-line description: its ``description`` or its docstring's first line."""
        plugin = self.get(name)
        text = getattr(plugin, "description", None) or (getattr(plugin, "__doc__", None) or "")
        return text.strip().split("\n")[0]

    def _unknown_message(self, name: str) -> str:
        valid = sorted(self._entries)
        message = f"unknown {self.kind} {name!r}; available: {', '.join(valid) if valid else '(none registered)'}"
        if name in self.families:
            members = ", ".join(self.families[name])
            return message + f". {name!r} is a family name ({members}): pass one of them"
        close = self.closest(name)
        if close:
            message += f". Did you mean {close!r}?"
        return message


ATTACKS = Registry("attack", {
    "none": "attacks.no_attack:NoAttack",
    "unlearndiffatk": "attacks.unlearndiffatk:UnlearnDiffAtk",
    "p4d-n": "attacks.p4d:P4DN",
    "p4d-k": "attacks.p4d:P4DK",
    "cce": "attacks.cce:CCE",
}, families={"p4d": ("p4d-n", "p4d-k")})

DEFENSES = Registry("defense", {
    "none": "defenses.no_defense:NoDefense",
    "esd-x": "defenses.esd:ESDCrossAttention",
    "esd-u": "defenses.esd:ESDUnconditional",
    "esd-full": "defenses.esd:ESDFull",
    "fmn": "defenses.fmn:ForgetMeNot",
    "advunlearn": "defenses.advunlearn:AdvUnlearn",
    "checkpoint": "defenses.checkpoints:PublishedCheckpoint",
}, families={"esd": ("esd-x", "esd-u")})

EVALUATORS = Registry("evaluator", {
    "world-classifier": "evaluators.world_classifier:WorldClassifier",
    "nudenet": "evaluators.nudenet:NudeNetEvaluator",
    "style-classifier": "evaluators.style_classifier:StyleClassifier",
    "object-classifier": "evaluators.object_classifier:ObjectClassifier",
    "fid": "evaluators.fid:FIDEvaluator",
    "clip-score": "evaluators.clip_score:ClipScoreEvaluator",
})

# Concepts and models are data: their entries are factories that return a Concept or a ModelSpec.
CONCEPTS = Registry("concept", populate="benchmark.concepts")
MODELS = Registry("model", {
    "world": "benchmark.world.model:load_world",
    "tiny-random": "benchmark.models.loading:build_tiny_model",
    "sd-v1-4": "benchmark.models.loading:load_sd14",
    "sd-v1-4-random": "benchmark.models.loading:build_sd14_random",
})

REGISTRIES: dict[str, Registry] = {
    "attack": ATTACKS,
    "defense": DEFENSES,
    "evaluator": EVALUATORS,
    "concept": CONCEPTS,
    "model": MODELS,
}


def registry_for(kind: str) -> Registry:
    try:
        return REGISTRIES[kind]
    except KeyError:
        raise UnknownPluginError(f"unknown plug-in kind {kind!r}; available: {', '.join(REGISTRIES)}") from None


def load_plugin(kind: str, name: str) -> Callable[..., Any]:
    return registry_for(kind).get(name)
