"""Concept evaluators, one module per judge; see ``benchmark.registry.EVALUATORS``."""
