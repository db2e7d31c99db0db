"""`cifarnet info`: versions, devices (Jetson-aware), usable precisions, directories and assets."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision

from cifarnet_cli import __version__, download, paths
from cifarnet_cli.data.sources import find_source
from cifarnet_cli.devices import (
    TEGRA_RELEASE,
    auto_precision,
    bf16_supported,
    is_integrated,
    mem_available_bytes,
    mps_available,
)
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.fileio import display


def _jetson_release() -> str | None:
    try:
        return TEGRA_RELEASE.read_text().splitlines()[0].strip().lstrip("# ").strip() or "unknown"
    except (OSError, IndexError):
        return None


def cuda_devices() -> list[dict[str, Any]]:
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        device = torch.device("cuda", i)
        integrated = is_integrated(device)
        dev: dict[str, Any] = {
            "index": i,
            "name": props.name,
            "total_memory_bytes": int(props.total_memory),
            "compute_capability": f"{props.major}.{props.minor}",
            "integrated": integrated,
        }
        try:
            free, _total = torch.cuda.mem_get_info(i)
            dev["free_memory_bytes"] = int(free)
        except RuntimeError:
            pass
        if integrated:
            # Unified memory: the CPU and GPU share RAM, so the usable figure is what the OS has available.
            dev["available_memory_bytes"] = mem_available_bytes()
        dev["bf16"] = bf16_supported(device)  # native only: is_bf16_supported() counts emulation
        dev["precision_auto"], dev["precision_reason"] = auto_precision(device)
        out.append(dev)
    return out


def directory_problems() -> list[str]:
    """One sentence per folder cifarnet writes to but cannot use."""
    return [
        f"Cannot write the {f.what} folder {display(f.path)}: {f.problem}."
        for f in paths.folder_status()
        if f.problem is not None and f.inside is None
    ]


def cuda_unavailable_reason() -> str | None:
    """Why torch sees no CUDA device, as far as this machine tells (None when it sees one)."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    if _jetson_release() is None and not Path("/proc/driver/nvidia/version").exists():
        return "no NVIDIA driver is loaded"
    return "the driver found no usable GPU (or is older than this torch's CUDA)"


def gather() -> dict[str, Any]:
    cuda = cuda_devices() if torch.cuda.is_available() else []
    devices: list[dict[str, Any]] = [{"type": "cuda", **d} for d in cuda]
    if mps_available():
        devices.append({"type": "mps", "name": "Apple GPU", "precision_auto": "fp32"})
    devices.append(
        {
            "type": "cpu",
            "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "precision_auto": auto_precision(torch.device("cpu"))[0],
        }
    )
    precisions: dict[str, list[str]] = {"cpu": ["fp32", "bf16"]}
    for dev in cuda:
        precisions[f"cuda:{dev['index']}"] = ["fp32", "fp16"] + (["bf16"] if dev["bf16"] else [])
    if mps_available():
        precisions["mps"] = ["fp32", "fp16"]
    data_dir = paths.default_data_dir()
    problems = directory_problems()
    weights = {}
    for name in ("resnet50-v1", "resnet50-v2"):
        asset = download.ASSETS[name]
        f = paths.torch_hub_checkpoints_dir() / asset.filename
        weights[name] = str(f) if f.is_file() else None
    try:
        found = find_source(data_dir)
    except CifarNetError as exc:
        found = None
        problems.append(str(exc))
    return {
        "cifarnet": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda_build": torch.version.cuda is not None,
        "cuda_version": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_unavailable_reason": cuda_unavailable_reason(),
        "jetson": _jetson_release(),
        "devices": devices,
        "default_device": "cuda" if cuda else ("mps" if mps_available() else "cpu"),
        "precisions": precisions,
        "directories": {
            "home": str(paths.home_dir()),
            "runs": str(paths.runs_dir()),
            "datasets": str(paths.datasets_dir()),
            "data": str(data_dir),
            "cache": str(paths.cache_dir()),
            "torch_hub": str(paths.torch_hub_checkpoints_dir()),
        },
        "assets": {
            "cifar10": str(found[1]) if found is not None else None,
            **weights,
        },
        "problems": problems,
    }
