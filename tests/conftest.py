"""Shared fixtures: a private cache folder and the tiny random model."""

from __future__ import annotations

import pytest

from benchmark.paths import CACHE_VARIABLE


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep erased weights and generated configs out of the user's cache."""
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_model():
    from benchmark.models.loading import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One thread: faster than two on a 2-core machine that runs anything else, and stable timings."""
    import torch

    torch.set_num_threads(1)
