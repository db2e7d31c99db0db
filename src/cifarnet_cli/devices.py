"""Device and precision choice: CUDA, then MPS, then CPU; bf16 where the hardware has it."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cifarnet_cli.errors import CifarNetError, UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
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
    raise UsageError(f"Unknown --device {spec!r}; choose one of: {', '.join(DEVICE_CHOICES)}.")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu"


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: the autocast dtype (None = fp32) and whether a grad scaler is needed."""

    name: str
    dtype: torch.dtype | None

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype is torch.float16


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """``auto`` is bf16 on CUDA where supported (Ampere and newer, Jetson Orin included), fp16 with a
    grad scaler on older CUDA GPUs and fp32 elsewhere (CPU autocast is slower than fp32 on most CPUs)."""
    spec = (spec or "auto").lower()
    if spec not in PRECISION_CHOICES:
        raise UsageError(f"Unknown --precision {spec!r}; choose one of: {', '.join(PRECISION_CHOICES)}.")
    if spec == "auto":
        if device.type == "cuda":
            spec = "bf16" if bf16_supported(device) else "fp16"
        else:
            spec = "fp32"
    if spec == "fp32":
        return Precision("fp32", None)
    if spec == "bf16":
        if device.type == "cuda" and not bf16_supported(device):
            raise CifarNetError("--precision bf16: this GPU has no bf16 support; use fp16 or auto.")
        return Precision("bf16", torch.bfloat16)
    if device.type == "cpu":
        raise CifarNetError("--precision fp16 is not supported on the CPU; use fp32, bf16 or auto.")
    return Precision("fp16", torch.float16)


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    if precision.dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=precision.dtype):
        yield


def describe(device: torch.device) -> str:
    """One line naming the device, e.g. ``cuda:0 (NVIDIA H200, 139.8 GiB)``."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory the device can still allocate, or None when torch cannot tell (CPU, MPS)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
