"""The values options accept, kept free of heavy imports so that `--help` and shell completion (which
runs `cifarnet` on every Tab press) answer without loading torch."""

from __future__ import annotations

import difflib
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

CIFAR_ARCHS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
#: The forms of --device: train and finetune-resnet50 start one process per GPU of a list.
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "cuda:N,M", "cuda:all", "mps")
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


def devices_here(
    *,
    nvidia_gpus: Path = Path("/proc/driver/nvidia/gpus"),
    tegra_release: Path = Path("/etc/nv_tegra_release"),
    system: str | None = None,
) -> tuple[str, ...]:
    """The --device values that name something on this machine, found without importing torch (shell
    completion runs on every Tab press): cuda and cuda:N for each GPU the NVIDIA driver lists (a Jetson's
    integrated GPU is cuda:0; elsewhere `nvidia-smi -L` answers when /proc has no driver folder, as under
    WSL), mps on macOS, and always auto and cpu."""
    count = 0
    try:
        count = sum(1 for entry in nvidia_gpus.iterdir() if entry.is_dir())
    except OSError:
        if tegra_release.is_file():
            count = 1
        elif shutil.which("nvidia-smi"):
            try:
                listed = subprocess.run(
                    ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=2, env=dict(os.environ)
                ).stdout
            except (OSError, subprocess.SubprocessError):
                listed = ""
            count = sum(1 for line in listed.splitlines() if line.startswith("GPU "))
    found = ["auto", "cpu"]
    if count:
        found += ["cuda", *(f"cuda:{i}" for i in range(count))]
    if (system or platform.system()) == "Darwin":
        found.append("mps")
    return tuple(found)
