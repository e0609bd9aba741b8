"""Locations of shipped data and of the user cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"
WORLD_WEIGHTS_DIR = PACKAGE_DIR / "world" / "weights"
CACHE_VARIABLE = "ERASURE_BENCH_CACHE"


def cache_dir() -> Path:
    """The cache for erased weights and generated config folders: $ERASURE_BENCH_CACHE or ~/.cache."""
    root = os.environ.get(CACHE_VARIABLE)
    path = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "robust-erasure-bench"
    path.mkdir(parents=True, exist_ok=True)
    return path
