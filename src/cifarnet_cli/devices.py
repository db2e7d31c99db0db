"""Device and precision choice: CUDA, then MPS, then CPU; bf16 where the hardware has it."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cifarnet_cli import choices
from cifarnet_cli.errors import CifarNetError, UsageError

DEVICE_CHOICES = choices.DEVICES
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a device that exists on this machine."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not mps_available():
            raise CifarNetError("--device mps: this machine has no usable Apple GPU; use --device cpu or auto.")
        return torch.device("mps")
    if "," in spec and spec.startswith("cuda:"):
        raise UsageError(
            f"--device {spec} names several GPUs: train and finetune-resnet50 start one process per GPU; this "
            "command runs on one device, e.g. --device cuda:0."
        )
    if spec == "cuda:all":  # every GPU, when there is one: the one there is
        spec = "cuda"
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match:
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA device"
            raise CifarNetError(f"--device {spec}: CUDA is not available ({build}); use --device cpu or auto.")
        index = int(match.group(1) or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise CifarNetError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})."
            )
        return torch.device("cuda", index)
    raise UsageError(choices.unknown("--device", spec, DEVICE_CHOICES))


def compute_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device: the device asked for, not the current one."""
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


# Native fp16 arithmetic rate relative to fp32, from the CUDA C Programming Guide's table "Throughput of
# Native Arithmetic Instructions": 5.3 (Jetson Nano/TX1) 2x, 6.0 (P100) 2x, 6.1 (GeForce 10, Quadro P)
# 1/64, 6.2 (Jetson TX2) 2x, 7.x 2x plus tensor cores; 5.0/5.2 have no fp16 arithmetic at all. bf16 is
# native from 8.0 (Ampere, Ada, Hopper, Jetson Orin 8.7); below that torch emulates it, slowly, although
# torch.cuda.is_bf16_supported() says yes.
_SLOW_FP16 = {(5, 0), (5, 2), (6, 1)}


def auto_precision(device: torch.device) -> tuple[str, str]:
    """The precision ``--precision auto`` picks on ``device``, and why (one clause, for `info` and the banner)."""
    if device.type == "cuda":
        major, minor = compute_capability(device)
        cc = f"compute capability {major}.{minor}"
        if major >= 8:
            return "bf16", f"{cc}: native bf16"
        if major < 5 or (major, minor) in _SLOW_FP16:
            return "fp32", f"{cc}: no fast fp16 or bf16"
        return "fp16", f"{cc}: fast fp16 (with a gradient scaler), no native bf16"
    if device.type == "mps":
        return "fp32", "Apple GPU: fp32"
    return "fp32", "CPU: autocast is slower than fp32 on most CPUs"


def bf16_supported(device: torch.device) -> bool:
    """bf16 computed natively (not emulated): CUDA compute capability 8.0 and newer, or the CPU."""
    if device.type == "cuda":
        return compute_capability(device)[0] >= 8
    return device.type == "cpu"


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: the autocast dtype (None = fp32) and whether a grad scaler is needed."""

    name: str
    dtype: torch.dtype | None
    reason: str = ""  # why it was chosen (for --precision auto)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype is torch.float16


_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """``auto`` picks by the chosen device's compute capability (:func:`auto_precision`); an explicit choice
    is honoured where the device computes it natively."""
    spec = (spec or "auto").lower()
    if spec not in PRECISION_CHOICES:
        raise UsageError(choices.unknown("--precision", spec, PRECISION_CHOICES))
    reason = "asked for"
    if spec == "auto":
        spec, reason = auto_precision(device)
    if spec == "bf16" and device.type == "cuda" and not bf16_supported(device):
        major, minor = compute_capability(device)
        raise CifarNetError(
            f"--precision bf16: {device} (compute capability {major}.{minor}) has no native bf16 (torch would "
            "emulate it, slowly); use --precision auto (fp16 there) or fp32."
        )
    if spec == "fp16" and device.type == "cpu":
        raise CifarNetError("--precision fp16 is not supported on the CPU; use fp32, bf16 or auto.")
    return Precision(spec, _DTYPES[spec], reason)


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision, *, cache: bool = True) -> Iterator[None]:
    """Mixed precision for ``precision``. ``cache=False`` for code captured in a CUDA graph: autocast's
    cache of cast weights must not outlive the capture (torch.cuda.graph documentation)."""
    if precision.dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=precision.dtype, cache_enabled=cache):
        yield


def describe(device: torch.device) -> str:
    """One line naming the device, e.g. ``cuda:0 (NVIDIA H200, 139.8 GiB)``."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"


MEMINFO = Path("/proc/meminfo")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux): what the OS can still hand out without swapping."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def is_integrated(device: torch.device) -> bool:
    """A GPU that shares the system's memory (Jetson): its usable memory is what the OS has available."""
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)
    return bool(getattr(props, "is_integrated", False)) or TEGRA_RELEASE.exists()


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory ``device`` can still allocate, or None when it cannot be told (MPS).

    On a Jetson ``cudaMemGetInfo`` counts memory the OS could reclaim from its caches as used and memory
    other processes may still take as free; MemAvailable is the figure the board actually has."""
    if device.type == "cuda":
        if is_integrated(device):
            available = mem_available_bytes()
            if available is not None:
                return available
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        return mem_available_bytes()
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
