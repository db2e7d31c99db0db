"""Model registry: ``get_model(name, **kwargs)`` builds any model cifarnet can train or load."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cifarnet_cli.choices import CIFAR_ARCHS, unknown
from cifarnet_cli.errors import UsageError
from cifarnet_cli.models._base import Classifier, Normalize
from cifarnet_cli.models.cifar_resnet import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CifarResNet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)

if TYPE_CHECKING:
    from cifarnet_cli.models.resnet50 import DEFAULT_IMAGE_SIZE, ResNet50Transfer


def _resnet50_module() -> Any:
    """models/resnet50.py, imported on first use: it imports torchvision, which costs about 2 s and 170 MB
    (torchvision pulls in torch._dynamo) that a ResNet-20 `predict` or `evaluate` never needs."""
    return importlib.import_module("cifarnet_cli.models.resnet50")


def _resnet50(**kwargs: Any) -> Classifier:
    return _resnet50_module().resnet50(**kwargs)


def __getattr__(name: str) -> Any:  # PEP 562: the ResNet-50 names load torchvision only when asked for
    if name in ("DEFAULT_IMAGE_SIZE", "ResNet50Transfer"):
        return getattr(_resnet50_module(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_REGISTRY: dict[str, Callable[..., Classifier]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet50": _resnet50,
}

# CIFAR_ARCHS (from choices): what `cifarnet train` builds from scratch; resnet50 comes through
# `finetune-resnet50`. It lives in a torch-free module so that shell completion stays fast.


def list_models() -> list[str]:
    return list(_REGISTRY)


def get_model(name: str, **kwargs: Any) -> Classifier:
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise UsageError(unknown("architecture", name, list(_REGISTRY))) from None
    return builder(**kwargs)


def count_parameters(model: Classifier, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR_ARCHS",
    "DEFAULT_IMAGE_SIZE",
    "Classifier",
    "CifarResNet",
    "Normalize",
    "ResNet50Transfer",
    "count_parameters",
    "get_model",
    "list_models",
]
