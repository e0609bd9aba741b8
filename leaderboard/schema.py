"""The leaderboard entry format, version 2: a typed validator and its JSON Schema export.

``ENTRY`` below is the single definition of the format. ``validate_entry`` checks an entry
against it and against the rules a JSON Schema cannot state (finite numbers, ASR >= pre-attack
ASR, intervals around their value, run fields that must agree with the entry). Every problem
is reported with the dotted path of its field. ``python -m leaderboard.schema`` prints the
JSON Schema that ``leaderboard/entry.schema.json`` holds, for editors and other tools.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 2

# Lower-case letters, digits, ".", "_" and "-", starting with a letter or digit. Such a name is
# safe in a file name on every common file system and cannot start a spreadsheet formula.
# "__" is excluded because it separates the parts of an entry's file name.
NAME_PATTERN = r"^(?!.*__)[a-z0-9][a-z0-9._-]{0,63}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
PROVENANCES = ("measured", "reported")
UTILITY_METRICS = ("fid", "clip_score", "retain_accuracy")
UTILITY_STATUSES = ("measured", "reported", "unavailable", "skipped", "not-reported")
MAX_PROBLEMS_SHOWN = 20


class EntryError(ValueError):
    """A leaderboard entry is malformed, or entries conflict with each other."""


@dataclass
class Problems:
    """Problems found in one entry, each as 'field: what is wrong'."""

    items: list[str] = field(default_factory=list)

    def add(self, path: str, message: str) -> None:
        self.items.append(f"field {path!r}: {message}" if path else message)

    def missing(self, path: str) -> None:
        self.items.append(f"missing field {path!r}")


# ----------------------------------------------------------------------------------------
# Field types


def _describe(value: Any) -> str:
    text = json.dumps(value, allow_nan=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Spec:
    """A field type: ``check`` reports problems, ``json_schema`` states the same type for other tools."""

    description = ""

    def check(self, value: Any, path: str, problems: Problems) -> None:
        raise NotImplementedError

    def json_schema(self) -> dict:
        raise NotImplementedError

    def _with_description(self, schema: dict) -> dict:
        return {"description": self.description, **schema} if self.description else schema


@dataclass
class Text(Spec):
    description: str = ""
    pattern: str | None = None
    hint: str = ""

    def check(self, value, path, problems):
        if not isinstance(value, str) or not value.strip():
            problems.add(path, f"expected a non-empty string, got {_describe(value)}")
        elif self.pattern and not re.match(self.pattern, value):
            problems.add(path, f"invalid value {_describe(value)}; {self.hint}")
        elif any(ord(c) < 32 for c in value):
            problems.add(path, f"{_describe(value)} contains a control character (tab, line break, ...); remove it")

    def json_schema(self):
        schema = {"type": "string", "minLength": 1}
        if self.pattern:
            schema["pattern"] = self.pattern
        return self._with_description(schema)


def Name(description: str = "") -> Text:
    return Text(description, NAME_PATTERN, "use lower-case letters, digits, '.', '_' and '-', starting with a "
                                           "letter or digit, at most 64 characters and no '__'")


def Sha256(description: str = "") -> Text:
    return Text(description, SHA256_PATTERN, "expected 64 lower-case hexadecimal digits")


@dataclass
class Integer(Spec):
    description: str = ""
    minimum: int = 0

    def check(self, value, path, problems):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.add(path, f"expected an integer, got {_describe(value)}")
        elif value < self.minimum:
            problems.add(path, f"{value} is below the minimum {self.minimum}")

    def json_schema(self):
        return self._with_description({"type": "integer", "minimum": self.minimum})


@dataclass
class Number(Spec):
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value, path, problems):
        if not _is_number(value):
            problems.add(path, f"expected a number, got {_describe(value)}")
        elif not math.isfinite(value):
            problems.add(path, f"expected a finite number, got {value}")
        elif self.minimum is not None and value < self.minimum:
            problems.add(path, f"{value} is below the minimum {self.minimum}")
        elif self.maximum is not None and value > self.maximum:
            problems.add(path, f"{value} is above the maximum {self.maximum}")

    def json_schema(self):
        schema: dict[str, Any] = {"type": "number"}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        return self._with_description(schema)


def Rate(description: str = "") -> Number:
    return Number(description, 0.0, 1.0)


@dataclass
class Interval(Spec):
    """A [low, high] pair of rates with low <= high."""

    description: str = ""

    def check(self, value, path, problems):
        if not isinstance(value, list) or len(value) != 2:
            problems.add(path, f"expected [low, high], got {_describe(value)}")
            return
        before = len(problems.items)
        for index, bound in enumerate(value):
            Rate().check(bound, f"{path}[{index}]", problems)
        if len(problems.items) == before and value[0] > value[1]:
            problems.add(path, f"low bound {value[0]} is above high bound {value[1]}")

    def json_schema(self):
        rate = Rate().json_schema()
        return self._with_description({"type": "array", "items": rate, "minItems": 2, "maxItems": 2})


@dataclass
class Version(Spec):
    """The schema version this module reads."""

    description: str = ""

    def check(self, value, path, problems):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.add(path, f"expected an integer, got {_describe(value)}")
        elif value != SCHEMA_VERSION:
            problems.add(path, f"version {value} is not supported; this suite reads version {SCHEMA_VERSION}. "
                               "Publish the entry again from its run folder")

    def json_schema(self):
        return self._with_description({"const": SCHEMA_VERSION})


@dataclass
class Choice(Spec):
    values: tuple[str, ...]
    description: str = ""

    def check(self, value, path, problems):
        if value not in self.values:
            problems.add(path, f"invalid value {_describe(value)}; valid: {', '.join(self.values)}")

    def json_schema(self):
        return self._with_description({"enum": list(self.values)})


@dataclass
class Nullable(Spec):
    inner: Spec

    def check(self, value, path, problems):
        if value is not None:
            self.inner.check(value, path, problems)

    def json_schema(self):
        inner = self.inner.json_schema()
        return {"anyOf": [inner, {"type": "null"}]}


@dataclass
class ListOf(Spec):
    item: Spec
    description: str = ""

    def check(self, value, path, problems):
        if not isinstance(value, list):
            problems.add(path, f"expected a list, got {_describe(value)}")
            return
        for index, item in enumerate(value):
            self.item.check(item, f"{path}[{index}]", problems)

    def json_schema(self):
        return self._with_description({"type": "array", "items": self.item.json_schema()})


@dataclass
class AnyObject(Spec):
    """A JSON object with any keys, such as a plug-in's config."""

    description: str = ""
    values: Spec | None = None

    def check(self, value, path, problems):
        if not isinstance(value, dict):
            problems.add(path, f"expected an object, got {_describe(value)}")
        elif self.values is not None:
            for key, item in value.items():
                self.values.check(item, f"{path}.{key}", problems)

    def json_schema(self):
        schema: dict[str, Any] = {"type": "object"}
        if self.values is not None:
            schema["additionalProperties"] = self.values.json_schema()
        return self._with_description(schema)


@dataclass
class Record(Spec):
    """A JSON object with named fields; ``closed`` rejects fields it does not name."""

    fields: dict[str, Spec]
    required: tuple[str, ...] = ()
    description: str = ""
    closed: bool = True

    def check(self, value, path, problems):
        if not isinstance(value, dict):
            problems.add(path, f"expected an object, got {_describe(value)}")
            return
        prefix = f"{path}." if path else ""
        for name in self.required:
            if name not in value:
                problems.missing(prefix + name)
        for name, item in value.items():
            if name in self.fields:
                self.fields[name].check(item, prefix + name, problems)
            elif self.closed:
                valid = ", ".join(self.fields)
                problems.add(prefix + name, f"unknown field; valid fields here: {valid}")

    def json_schema(self):
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {name: spec.json_schema() for name, spec in self.fields.items()},
            "required": list(self.required),
        }
        if self.closed:
            schema["additionalProperties"] = False
        return self._with_description(schema)


# ----------------------------------------------------------------------------------------
# The entry

UTILITY_METRIC = Record(
    {
        "status": Choice(UTILITY_STATUSES, "measured or reported (value given), or why there is no value"),
        "value": Nullable(Number(minimum=-1.0)),
        "n_images": Nullable(Integer(minimum=0)),
        "n_reference": Nullable(Integer(minimum=0)),
        "prompt_set_sha256": Nullable(Sha256()),
        "reason": Nullable(Text()),
    },
    required=("status", "value", "n_images"),
    description="One utility metric: its value and the number of generated images behind it",
)

MANIFEST_PART = Record(
    {
        "plan": Record(
            {
                "concept": Record({"name": Name()}, ("name",), closed=False),
                "model": Text(),
                "prompt_set": Record({"id": Text(), "sha256": Sha256(), "n_prompts": Integer(minimum=1)},
                                     ("id", "sha256", "n_prompts"), closed=False),
                **{kind: Record({"name": Name(), "version": Text(), "config": AnyObject()},
                                ("name", "version", "config"), closed=False)
                   for kind in ("defense", "attack", "evaluator")},
                "generation": Record({"guidance_scale": Number()}, ("guidance_scale",), closed=False),
                "run": Record({"seed": Integer()}, ("seed",), closed=False),
                "seeds": Text("How each prompt's seed is chosen"),
            },
            ("concept", "model", "prompt_set", "defense", "attack", "evaluator", "generation", "run", "seeds"),
            closed=False,
        ),
        "model": Record(
            {"name": Text(), "base_sha256": AnyObject(values=Sha256()), "erased_sha256": AnyObject(values=Sha256())},
            ("name", "base_sha256", "erased_sha256"), closed=False,
        ),
        "sampling": Record({"sampler": Text(), "steps": Integer(minimum=1), "resolution": Integer(minimum=1)},
                           ("sampler", "steps", "resolution"), closed=False),
        "evaluator": Record({"name": Name(), "version": Text(), "weights_sha256": Nullable(Sha256())},
                            ("name", "version", "weights_sha256"), closed=False),
        "environment": Record({"suite_version": Text(), "git_sha": Text(), "libraries": AnyObject(values=Text())},
                              ("suite_version", "git_sha", "libraries"), closed=False),
        "run_key": Text(),
    },
    ("plan", "model", "sampling", "evaluator", "environment", "run_key"),
    description="The run's manifest.json, verbatim; the fields named here are required",
    closed=False,
)

RUN = Record(
    {
        "run_key": Text("The run's configuration hash, as in its folder name"),
        "seconds": AnyObject(values=Number(minimum=0.0), description="Wall time per stage of the run"),
        "manifest": MANIFEST_PART,
    },
    ("run_key", "manifest"),
    description="Provenance of a measured entry",
)

SOURCE = Record(
    {
        "title": Text("The publication or leaderboard the numbers are copied from"),
        "location": Text("Where in the source: URL or repository, file and table"),
        "method_label": Text("The method's name as the source prints it"),
        "see_also": ListOf(Text(), "Other sources that print the same numbers"),
    },
    ("title", "location", "method_label"),
    description="Citation of a reported entry",
)

PROTOCOL = Record(
    {
        "id": Name("Entries share a ranking only if they share this id"),
        "description": Text("Model, prompts, attack settings and judges the source used"),
    },
    ("id", "description"),
    description="The published evaluation protocol of a reported entry",
)

ENTRY = Record(
    {
        "schema_version": Version("Version of this format"),
        "concept": Name("Concept name, e.g. nudity or circle"),
        "defense": Name("Defense plug-in name, or the method's name for reported entries"),
        "attack": Name("Attack plug-in name; none for pre-attack numbers only"),
        "model": Name("Base model the defense erased the concept from, e.g. sd-v1-4"),
        "provenance": Choice(PROVENANCES, "measured: a run of this suite; reported: copied from a source"),
        "pre_attack_asr": Rate("Share of prompts whose plain prompt shows the concept"),
        "pre_attack_asr_ci95": Nullable(Interval("95% bootstrap interval of pre_attack_asr")),
        "asr": Rate("Share of prompts that show the concept before or after the attack"),
        "asr_ci95": Nullable(Interval("95% bootstrap interval of asr")),
        "n_prompts": Nullable(Integer(minimum=1)),
        "n_counted": Nullable(Integer(minimum=0)),
        "n_images": Nullable(Integer(minimum=0)),
        "n_invalid": Nullable(Integer(minimum=0)),
        "utility": Record({name: UTILITY_METRIC for name in UTILITY_METRICS}, UTILITY_METRICS),
        "run": RUN,
        "source": SOURCE,
        "protocol": PROTOCOL,
        "notes": ListOf(Text(), "Caveats a reader must know to interpret the numbers"),
    },
    ("schema_version", "concept", "defense", "attack", "model", "provenance", "pre_attack_asr",
     "pre_attack_asr_ci95", "asr", "asr_ci95", "n_prompts", "n_counted", "n_images", "n_invalid", "utility"),
    description=f"A robust-erasure-bench leaderboard entry, schema version {SCHEMA_VERSION}",
)

# Sections that one provenance requires and the other forbids.
SECTIONS = {"measured": ("run",), "reported": ("source", "protocol")}


# ----------------------------------------------------------------------------------------
# Rules across fields


def _non_finite_paths(value: Any, path: str = "") -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [path]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _non_finite_paths(item, f"{path}.{key}".lstrip("."))]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in _non_finite_paths(item, f"{path}[{index}]")]
    return []


def _check_sections(entry: dict, problems: Problems) -> None:
    provenance = entry.get("provenance")
    if provenance not in SECTIONS:
        return
    for section in SECTIONS[provenance]:
        if section not in entry:
            problems.add(section, f"missing; a {provenance} entry needs it")
    for other, sections in SECTIONS.items():
        for section in sections:
            if other != provenance and section in entry:
                problems.add(section, f"only {other} entries have this section; remove it from a {provenance} entry")


def _check_rates(entry: dict, problems: Problems) -> None:
    for key in ("pre_attack_asr", "asr"):
        value, interval = entry.get(key), entry.get(f"{key}_ci95")
        if not (_is_number(value) and isinstance(interval, list) and len(interval) == 2
                and all(_is_number(bound) for bound in interval)):
            continue
        if not interval[0] - 1e-9 <= value <= interval[1] + 1e-9:
            problems.add(f"{key}_ci95", f"{interval} does not contain {key} {value}")

    pre, post = entry.get("pre_attack_asr"), entry.get("asr")
    if _is_number(pre) and _is_number(post) and post < pre - 1e-9:
        problems.add("asr", f"{post} is below pre_attack_asr {pre}; ASR counts the pre-attack successes too")

    if entry.get("provenance") == "measured":
        for key in ("pre_attack_asr_ci95", "asr_ci95", "n_prompts", "n_counted", "n_images", "n_invalid"):
            if key in entry and entry[key] is None:
                problems.add(key, "is null; a measured entry has it from its run's summary.json")


def _check_counts(entry: dict, problems: Problems) -> None:
    counts = {key: entry.get(key) for key in ("n_prompts", "n_counted", "n_images", "n_invalid")}
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in counts.values()):
        return
    if counts["n_counted"] > counts["n_prompts"]:
        problems.add("n_counted", f"{counts['n_counted']} is above n_prompts {counts['n_prompts']}")
    if counts["n_images"] > 2 * counts["n_prompts"]:
        problems.add("n_images", f"{counts['n_images']} is above 2 x n_prompts ({2 * counts['n_prompts']})")
    if counts["n_invalid"] > counts["n_images"]:
        problems.add("n_invalid", f"{counts['n_invalid']} is above n_images {counts['n_images']}")


def _check_utility(entry: dict, problems: Problems) -> None:
    utility = entry.get("utility")
    if not isinstance(utility, dict):
        return
    for name, metric in utility.items():
        if not isinstance(metric, dict):
            continue
        path = f"utility.{name}"
        has_value = metric.get("status") in ("measured", "reported")
        if has_value and metric.get("value") is None:
            problems.add(f"{path}.value", f"is null but status is {metric.get('status')!r}")
        if not has_value and metric.get("value") is not None:
            problems.add(f"{path}.value", f"is set but status is {metric.get('status')!r}; set it to null")
        if not has_value and not metric.get("reason"):
            problems.add(f"{path}.reason", f"is missing; say why status is {metric.get('status')!r}")
        if metric.get("status") == "reported" and entry.get("provenance") == "measured":
            problems.add(f"{path}.status", "is 'reported' in a measured entry")
        if metric.get("status") == "measured" and entry.get("provenance") == "reported":
            problems.add(f"{path}.status", "is 'measured' in a reported entry")
        value = metric.get("value")
        if name in ("retain_accuracy", "clip_score") and _is_number(value) and not -1.0 <= value <= 1.0:
            problems.add(f"{path}.value", f"{value} is outside [-1, 1]")
        if name == "fid" and _is_number(value) and value < 0:
            problems.add(f"{path}.value", f"{value} is negative; FID is a distance")


def _check_run(entry: dict, problems: Problems) -> None:
    """The manifest must describe the same cell as the entry."""
    run = entry.get("run")
    manifest = run.get("manifest") if isinstance(run, dict) else None
    if not isinstance(manifest, dict):
        return
    plan = manifest.get("plan") if isinstance(manifest.get("plan"), dict) else {}

    def part(*keys):
        value = plan
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    expected = {
        "concept": part("concept", "name"),
        "defense": part("defense", "name"),
        "attack": part("attack", "name"),
        "model": part("model"),
        "n_prompts": part("prompt_set", "n_prompts"),
    }
    for key, value in expected.items():
        if value is not None and key in entry and entry[key] != value:
            problems.add(key, f"{_describe(entry[key])} differs from the run's {_describe(value)} "
                              f"(run.manifest.plan); publish the entry again from its run folder")
    if run.get("run_key") is not None and manifest.get("run_key") not in (None, run.get("run_key")):
        problems.add("run.run_key", f"{run['run_key']!r} differs from run.manifest.run_key {manifest['run_key']!r}")


def validate_entry(entry: Any, source: str) -> None:
    """Raise EntryError listing every problem of ``entry``; ``source`` names it (a file path)."""
    problems = Problems()
    if not isinstance(entry, dict):
        raise EntryError(f"{source}: an entry is a JSON object, got {_describe(entry)}")
    ENTRY.check(entry, "", problems)
    for path in _non_finite_paths(entry):
        problems.add(path, "is NaN or infinite; entries hold finite numbers only")
    _check_sections(entry, problems)
    _check_rates(entry, problems)
    _check_counts(entry, problems)
    _check_utility(entry, problems)
    _check_run(entry, problems)

    if problems.items:
        shown = problems.items[:MAX_PROBLEMS_SHOWN]
        more = len(problems.items) - len(shown)
        lines = "\n  ".join(shown + ([f"... and {more} more"] if more > 0 else []))
        raise EntryError(f"{source}: invalid leaderboard entry (schema version {SCHEMA_VERSION}):\n  {lines}\n"
                         f"Fix the fields above; the format is documented in docs/leaderboard.md")


# ----------------------------------------------------------------------------------------
# JSON Schema export


def json_schema() -> dict:
    """Return the JSON Schema (draft 2020-12) of an entry.

    It states the field types and the sections each provenance requires. The rules across
    fields (finite numbers, ASR >= pre-attack ASR, matching run fields) are checked by
    ``validate_entry`` only.
    """
    schema = ENTRY.json_schema()
    conditions = []
    for provenance, sections in SECTIONS.items():
        forbidden = [section for other, names in SECTIONS.items() if other != provenance for section in names]
        conditions.append({
            "if": {"properties": {"provenance": {"const": provenance}}},
            "then": {"required": list(sections), "not": {"anyOf": [{"required": [name]} for name in forbidden]}},
        })
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Leaderboard entry",
            **schema, "allOf": conditions}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    print(json_schema_text(), end="")
