"""Measure how well the default world's base model follows its prompts.

    python -m benchmark.world.quality --samples 4 --output docs/world-quality.json

Every prompt of the concept prompt sets and the retain set is generated with the sampler,
steps and guidance that ``run`` uses (DDIM, 15 steps, the prompt's guidance), from the prompt's
own seed and ``samples - 1`` further seeds. The world's classifier then reads each image, and
an attribute counts only for prompts that name it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmark.concepts import resolve_concept
from benchmark.generation import Sampling, generate, to_uint8
from benchmark.models.loading import load_model
from benchmark.world.classifier import HEADS

PROMPT_SETS = {"circle": "prompts", "striped": "prompts", "retain": "retain"}
ATTRIBUTES = tuple(HEADS)


def _records(set_name: str):
    if set_name == "retain":
        return resolve_concept("circle").load_retain().records
    return resolve_concept(set_name).load_prompts().records


def measure(model, classifier, records, samples: int, sampling: Sampling) -> dict:
    """Return per-attribute accuracy and counts over ``records`` x ``samples`` images."""
    prompts, seeds, guidance, expected = [], [], [], []
    for record in records:
        for offset in range(samples):
            prompts.append(record.prompt)
            seeds.append(record.seed + offset)
            guidance.append(record.guidance)
            expected.append(record.extra)

    images = [to_uint8(image) for image in generate(model, seeds, guidance, sampling, prompts=prompts,
                                                     batch_size=16, batch_invariant=False)]
    logits = classifier.logits(images)
    predicted = {name: [HEADS[name][i] for i in logits[name].argmax(1).tolist()] for name in ATTRIBUTES}

    result = {"images": len(images)}
    for name in ATTRIBUTES:
        named = [i for i, target in enumerate(expected) if target.get(name)]
        correct = sum(predicted[name][i] == expected[i][name] for i in named)
        result[name] = {"accuracy": correct / len(named) if named else None, "images": len(named)}
    return result


def main(argv=None) -> None:
    from evaluators.world_classifier import WorldClassifier

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4, help="images per prompt")
    parser.add_argument("--max-prompts", type=int, default=0, help="prompts per set (0: all)")
    parser.add_argument("--model", default="world")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = load_model(args.model)
    classifier = WorldClassifier(WorldClassifier.Config(batch_size=256))
    sampling = Sampling(model.default_sampler, model.default_steps, model.resolution)
    started = time.time()

    results = {"sampling": {"sampler": sampling.sampler, "steps": sampling.steps, "resolution": sampling.resolution},
               "samples_per_prompt": args.samples, "sets": {}}
    for set_name in PROMPT_SETS:
        records = _records(set_name)
        records = records[: args.max_prompts] if args.max_prompts else records
        results["sets"][set_name] = measure(model, classifier, records, args.samples, sampling)
        print(set_name, json.dumps(results["sets"][set_name]), flush=True)

    for name in ATTRIBUTES:
        counts = [s[name] for s in results["sets"].values() if s[name]["accuracy"] is not None]
        total = sum(c["images"] for c in counts)
        results[f"overall_{name}"] = sum(c["accuracy"] * c["images"] for c in counts) / total if total else None
    results["seconds"] = round(time.time() - started, 1)
    results["weights"] = json.loads((Path(model.source) / "world.json").read_text()).get("command") \
        if (Path(model.source) / "world.json").exists() else model.source
    print(json.dumps({k: v for k, v in results.items() if k.startswith("overall")}))

    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
