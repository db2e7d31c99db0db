"""The values options accept, kept free of heavy imports so that `--help` and shell completion (which
runs `cifarnet` on every Tab press) answer without loading torch."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

CIFAR_ARCHS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
DEVICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CAPTURE = ("auto", "on", "off")
SCHEDULES = ("cosine", "multistep")
SPLITS = ("test", "val", "train", "all")
EXPORT_FORMATS = ("onnx", "torchscript", "engine")
EXPORT_TARGETS = ("jetson-inference",)
ASSETS = ("cifar10", "resnet50-v1", "resnet50-v2")
WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2", "none")


def unknown(option: str, value: str, allowed: Sequence[str], *, extra: str = "") -> str:
    """The one line for a value ``option`` does not accept: the value as typed, the closest choice when one
    is close (a typo), and every choice."""
    close = difflib.get_close_matches(value.strip().lower(), [a.lower() for a in allowed], n=1, cutoff=0.6)
    suggestion = next((f" Did you mean {a}?" for a in allowed if close and a.lower() == close[0]), "")
    return f"Unknown {option} {value!r}.{suggestion} Choose one of: {', '.join(allowed)}{extra}."
