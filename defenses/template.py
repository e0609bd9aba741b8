"""Template for a new defense: copy this file, rename the classes and replace ``erase``.

This example is complete and runs unchanged. It fine-tunes the key and value projections of the UNet's
cross-attention layers (``attn2.to_k`` and ``attn2.to_v``) so that the concept phrase's text
states produce the keys and values that the frozen model gives an anchor phrase (by default
the empty prompt). Cross-attention is the only path from the text into the UNet, so the
concept phrase then steers generation like the anchor does. The loss is the mean squared
error summed over layers,

    sum_l mean((W_l(c) - W0_l(a))^2)

with W_l the trained projection, W0_l the frozen one, c the concept's text states and a the
anchor's. No random numbers are drawn, so the same inputs always give the same weights.

A defense is registered nowhere by default. To run this one, register it, e.g. in
``benchmark/registry.py``::

    DEFENSES = Registry("defense", {..., "template": "defenses.template:TemplateDefense"})

or from your own package (``pyproject.toml``)::

    [project.entry-points."robust_erasure_bench.defenses"]
    template = "my_package.template:TemplateDefense"

then ``python -m benchmark run --defense template``. ``tests/test_conformance.py`` checks
every registered defense and this template: interface, config round trip, determinism and a
one-step run on the tiny random model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmark.config import bounds
from benchmark.models.handle import ModelHandle
from benchmark.plugins import Defense, ErasureContext

PROJECTIONS = ("attn2.to_k", "attn2.to_v")


@dataclass
class TemplateConfig:
    """The template defense's settings.

    Every field needs a default (the reference method's value), a type the config loader
    reads (bool, int, float, str, lists of them, or ``X | None``), and bounds or choices where
    a value can be wrong. Users override them with ``--set defense.iterations=20``.
    """

    # Phrase whose keys and values the concept's should match; empty: the empty prompt.
    anchor: str = ""
    iterations: int = field(default=50, metadata=bounds(min=1))
    lr: float = field(default=1e-3, metadata=bounds(min=0))


class TemplateDefense(Defense):
    """Template: map the concept's cross-attention keys and values onto an anchor phrase's."""

    # The registry name; keep it equal to the name you register the class under.
    name = "template"
    # Bump the version whenever a change alters the erased weights, so that cached erasures
    # and leaderboard entries of the old code can be distinguished from the new ones.
    version = "1"
    Config = TemplateConfig

    def erase(self, model: ModelHandle, context: ErasureContext) -> dict[str, dict[str, torch.Tensor]]:
        """Train ``model`` (a copy of the base model) and return the weights that changed.

        ``context.original`` is the frozen base model: read from it, never change it. The
        runner caches the returned weights by (base model, defense name, version, config,
        concept, seed), so ``erase`` runs once per distinct erasure.
        """
        with torch.no_grad():
            concept_states = context.original.encode_prompts([context.concept.erase_phrase])
            anchor_states = context.original.encode_prompts([self.config.anchor])

        trained = {name: module for name, module in model.unet.named_modules() if name.endswith(PROJECTIONS)}
        frozen = dict(context.original.unet.named_modules())
        with torch.no_grad():
            targets = {name: frozen[name](anchor_states) for name in trained}

        model.unet.requires_grad_(False)
        parameters = {f"{name}.{key}": parameter for name, module in trained.items()
                      for key, parameter in module.named_parameters()}
        for parameter in parameters.values():
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(parameters.values(), lr=self.config.lr)

        for _ in range(self.config.iterations):
            loss = sum(F.mse_loss(module(concept_states), targets[name]) for name, module in trained.items())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        model.unet.requires_grad_(False)
        return {"unet": {name: parameter.detach().clone() for name, parameter in parameters.items()}}
