"""What a result depends on: suite version and git SHA, library versions, machine."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "robust-erasure-bench"
LIBRARIES = ("torch", "torchvision", "diffusers", "transformers", "numpy", "safetensors", "pillow",
             "open_clip_torch", "nudenet", "onnxruntime", "torch-fidelity", "scipy")


def suite_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "uninstalled"


def git_sha() -> str:
    """The suite's git commit, with '+dirty' when files differ from it; 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model() -> str | None:
    """Return the CPU's model name from /proc/cpuinfo, or None where that file does not exist (macOS, Windows)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else None


def environment() -> dict:
    """Return the versions, commit and machine of a result.

    The CPU model and the vector instructions torch uses on it (``cpu_capability``, e.g. AVX2 or
    AVX512) are recorded because float rounding in CPU kernels can depend on the processor. A
    training or an attack amplifies such differences, so CPU runs on different processors may
    differ.
    """
    import torch

    return {
        "suite_version": suite_version(),
        "git_sha": git_sha(),
        "libraries": library_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpu": cpu_model(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
