"""Concept-erasure defenses, one module per method; see ``benchmark.registry.DEFENSES``."""
