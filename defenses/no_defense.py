"""The ``none`` defense: the base model, unchanged."""

from __future__ import annotations

from benchmark.plugins import Defense, ErasureContext


class NoDefense(Defense):
    """No erasure: the base model as it is."""

    name = "none"

    def erase(self, model, context: ErasureContext) -> dict:
        return {}
