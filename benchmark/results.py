"""The run folder: manifest, append-only records, images, summary and grid.

``records.jsonl`` holds one JSON line per finished prompt. Each line is written with a single
``write`` on an append-only file and fsync'ed, after the prompt's images are on disk. A run
killed at any moment leaves at most one torn last line, which the next open removes, so a
resumed run ends with exactly the records of an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
SUMMARY = "summary.json"
GRID = "grid.png"
LOCK = ".lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used: not writable, locked, or made by a different configuration."""


def write_json_atomic(path: Path, data: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """Read complete records; with ``repair``, cut a torn last line off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, good_length, offset = [], 0, 0
    for line in data.split(b"\n")[:-1]:
        offset += len(line) + 1
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good_length = offset
    if repair and good_length != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(good_length)
            os.fsync(handle.fileno())
    return records


class RunFolder:
    """One run's folder, locked for the lifetime of the object."""

    def __init__(self, path: Path, run_key: str, fresh: bool = False) -> None:
        self.path = Path(path)
        self.run_key = run_key
        self._lock_handle = None
        self._open(fresh)

    def _open(self, fresh: bool) -> None:
        if fresh and self.path.exists():
            shutil.rmtree(self.path)
        try:
            (self.path / "images").mkdir(parents=True, exist_ok=True)
            self._lock_handle = open(self.path / LOCK, "w")
        except OSError as error:
            raise RunFolderError(
                f"cannot write the run folder {self.path}: {error.strerror}. Choose another results root with --output"
            ) from error
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(f"another process is writing {self.path}; wait for it or stop it") from None

        manifest = self.path / MANIFEST
        if manifest.exists():
            existing = json.loads(manifest.read_text()).get("run_key")
            if existing != self.run_key:
                raise RunFolderError(
                    f"{self.path} holds a run with another configuration (run key {existing}, now {self.run_key}); "
                    "rerun with --fresh to replace it, or choose another --output"
                )

    def close(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    def write_manifest(self, manifest: dict) -> None:
        write_json_atomic(self.path / MANIFEST, {**manifest, "run_key": self.run_key})

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.path / SUMMARY, summary)

    def records(self) -> list[dict]:
        return read_records(self.path / RECORDS, repair=True)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        descriptor = os.open(self.path / RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
