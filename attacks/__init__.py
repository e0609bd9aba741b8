"""Adversarial prompt attacks, one module per method; see ``benchmark.registry.ATTACKS``."""
