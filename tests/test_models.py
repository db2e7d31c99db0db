from __future__ import annotations

import pytest
import torch
from torch import nn

from cifarnet_cli.errors import UsageError
from cifarnet_cli.models import CIFAR_ARCHS, CifarResNet, count_parameters, get_model, list_models


def _expected_params(depth: int, num_classes: int = 10) -> int:
    """Count the CIFAR ResNet parameters from the paper's topology, independently of the code."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    in_c = 16
    for stage, c in enumerate((16, 32, 64)):
        for i in range(n):
            total += in_c * c * 9 + 2 * c + c * c * 9 + 2 * c
            if stage > 0 and i == 0:
                total += in_c * c + 2 * c  # 1×1 projection + BN
            in_c = c
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize(
    "name,depth", [("resnet20", 20), ("resnet32", 32), ("resnet44", 44), ("resnet56", 56), ("resnet110", 110)]
)
def test_cifar_resnet_parameter_counts(name: str, depth: int) -> None:
    model = get_model(name)
    assert count_parameters(model) == _expected_params(depth)


def test_resnet20_has_about_027m_parameters() -> None:
    assert count_parameters(get_model("resnet20")) == 272_474


def test_resnet20_topology() -> None:
    model = get_model("resnet20")
    assert isinstance(model, CifarResNet)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # + the linear head = 20 weighted layers
    assert convs[0].in_channels == 3 and convs[0].out_channels == 16
    projections = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [(16, 32, (2, 2)), (32, 64, (2, 2))]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_kaiming_fan_out_init() -> None:
    torch.manual_seed(0)
    conv = get_model("resnet56").blocks[10].conv1  # 32→32 3×3: fan_out = 32 * 9
    expected_std = (2.0 / (32 * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.1)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_classifies_a_batch(name: str) -> None:
    kwargs = {"image_size": 32} if name == "resnet50" else {}
    model = get_model(name, num_classes=7, **kwargs).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)
    assert out.shape == (2, 7)
    assert features.shape[:2] == (2, model.num_features)
    model.reset_classifier(4)
    assert model(x).shape == (2, 4)
    assert model.get_classifier().out_features == 4


def test_resnet50_resizes_on_device() -> None:
    model = get_model("resnet50", image_size=64).eval()
    with torch.no_grad():
        features = model.forward_features(torch.rand(1, 3, 32, 32))
    assert features.shape == (1, 2048, 2, 2)  # 64 / 32


def test_models_normalize_inside() -> None:
    model = get_model("resnet20")
    mean, std = model.normalization
    assert mean == pytest.approx([0.4914, 0.4822, 0.4465]) and std == pytest.approx([0.2470, 0.2435, 0.2616])


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(UsageError) as err:
        get_model("resnet18")
    for name in CIFAR_ARCHS:
        assert name in str(err.value)
