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
from cifarnet_cli.devices import bf16_supported, mps_available
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.fileio import display, problem

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
MEMINFO = Path("/proc/meminfo")


def _jetson_release() -> str | None:
    try:
        return TEGRA_RELEASE.read_text().splitlines()[0].strip().lstrip("# ").strip() or "unknown"
    except (OSError, IndexError):
        return None


def _mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo: on unified-memory boards (Jetson) this is what the GPU can get too."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cuda_devices() -> list[dict[str, Any]]:
    out = []
    jetson = _jetson_release()
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        integrated = bool(getattr(props, "is_integrated", False)) or jetson is not None
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
            dev["available_memory_bytes"] = _mem_available_bytes()
        dev["bf16"] = bool(torch.cuda.is_bf16_supported()) if i == torch.cuda.current_device() else props.major >= 8
        out.append(dev)
    return out


def _folder_problem(path: Path) -> str | None:
    """Why cifarnet could not write into ``path`` (None when it can, or can create it)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{display(existing)} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "the file system is read-only" if _read_only(existing) else "no permission to write there"
    return None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def directory_problems() -> list[str]:
    """One sentence per folder cifarnet writes to but cannot use (CIFARNET_HOME a file, read-only ...)."""
    out: list[str] = []
    broken: list[Path] = []
    for what, path in (
        ("home", paths.home_dir()),
        ("runs", paths.runs_dir()),
        ("datasets", paths.datasets_dir()),
        ("cache", paths.cache_dir()),
    ):
        if any(path.is_relative_to(b) for b in broken):
            continue  # inside a folder already reported: same problem
        try:
            why = _folder_problem(path)
        except OSError as exc:
            why = problem(exc, path)
        if why is not None:
            broken.append(path)
            out.append(f"Cannot write the {what} folder {display(path)}: {why}.")
    return out


def gather() -> dict[str, Any]:
    cuda = cuda_devices() if torch.cuda.is_available() else []
    devices: list[dict[str, Any]] = [{"type": "cuda", **d} for d in cuda]
    if mps_available():
        devices.append({"type": "mps", "name": "Apple GPU"})
    devices.append(
        {
            "type": "cpu",
            "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
    )
    precisions: dict[str, list[str]] = {"cpu": ["fp32", "bf16"]}
    if cuda:
        precisions["cuda"] = ["fp32", "fp16"] + (["bf16"] if bf16_supported(torch.device("cuda")) else [])
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
