"""Robust concept-erasure benchmark for text-to-image diffusion models."""
