"""Locations of shipped data and of the user cache."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

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


@contextlib.contextmanager
def exclusive_lock(path: Path, description: str) -> Iterator[None]:
    """Take an exclusive file lock on ``path`` for the block, waiting while another process has it.

    ``description`` names what the lock guards in the log line written while waiting.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s is locked by another process; waiting for the lock", description)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
