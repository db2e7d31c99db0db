"""Micro-batches that fit: the largest micro-batch the device's memory holds, from a short measured probe.

Training memory is close to linear in the micro-batch: a fixed part (weights, gradients, momentum, the data
set when it lives on the device) and a part per image (the activations saved for the backward pass). Two
probe steps at small batches give both; the micro-batch is then the largest divisor of the effective batch
whose estimate stays within a safety share of the free memory, and the accumulation makes up the rest, so the
recipe (effective batch, learning rate, schedule) does not change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifarnet_cli.devices import Precision, autocast, free_memory_bytes, is_integrated
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.models import Classifier

#: Share of the free memory a run plans to use. The rest absorbs the caching allocator's fragmentation,
#: cuDNN workspaces chosen by autotuning, and (on a Jetson) the CPU side of the same memory.
SAFETY = 0.8


@dataclass(frozen=True)
class MemoryFit:
    batch_size: int
    accum: int
    bytes_per_image: int
    fixed_bytes: int
    budget_bytes: int  # memory the run may use in all
    measured: bool  # False off CUDA: nothing was probed, the recipe's micro-batch is kept

    def describe(self) -> str:
        if not self.measured:
            return f"micro-batch {self.batch_size} × accum {self.accum} (the recipe's; not probed off CUDA)"
        return (
            f"micro-batch {self.batch_size} × accum {self.accum}: about {self.bytes_per_image / 2**20:.1f} MiB per "
            f"image and {self.fixed_bytes / 2**30:.2f} GiB fixed, within {self.budget_bytes / 2**30:.1f} GiB "
            f"({SAFETY:.0%} of what is free)"
        )


def _peak_bytes(model: Classifier, device: torch.device, precision: Precision, batch: int) -> int:
    """Peak memory allocated by one training step (forward, backward, SGD update) at ``batch``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    with autocast(device, precision, cache=False):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    del x, y, loss, optimizer
    return peak


def fit_micro_batch(
    model: Classifier, *, device: torch.device, precision: Precision, effective_batch: int, cap: int
) -> MemoryFit:
    """The largest divisor of ``effective_batch``, at most ``cap``, whose training step fits in memory.

    The probe trains a copy of ``model`` (the model itself is left as it was) with cuDNN autotuning off,
    so that the figures do not include the workspaces of algorithms being tried.
    """
    cap = max(1, min(cap, effective_batch))
    if device.type != "cuda" or cap <= 2:
        return MemoryFit(cap, max(1, effective_batch // cap), 0, 0, 0, measured=False)
    small, large = max(1, min(8, cap // 2)), min(16, cap)
    probe = copy.deepcopy(model).train()
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        torch.cuda.empty_cache()
        allocated = int(torch.cuda.memory_allocated(device))
        reserved = int(torch.cuda.memory_reserved(device))
        free = free_memory_bytes(device) or 0
        if not is_integrated(device):
            free += reserved - allocated  # cached by this process: free for its own use
        budget = allocated + int(SAFETY * free)
        p_small = _peak_bytes(probe, device, precision, small)
        p_large = _peak_bytes(probe, device, precision, large)
    except torch.cuda.OutOfMemoryError:
        raise CifarNetError(
            f"Not even a micro-batch of {small} images fits in the GPU's memory; free memory (other processes) "
            "or use a smaller --image-size."
        ) from None
    finally:
        torch.backends.cudnn.benchmark = benchmark
        del probe
        torch.cuda.empty_cache()
    per_image = max(1, (p_large - p_small) // max(1, large - small))
    fixed = max(0, p_small - per_image * small)
    return choose_micro_batch(effective_batch, cap, per_image=per_image, fixed=fixed, budget=budget)


def choose_micro_batch(effective_batch: int, cap: int, *, per_image: int, fixed: int, budget: int) -> MemoryFit:
    """The largest divisor of ``effective_batch`` (at most ``cap``, at least 2) with
    ``fixed + batch × per_image <= budget``."""
    limit = (budget - fixed) // max(1, per_image)
    divisors = [d for d in range(min(cap, effective_batch, limit), 1, -1) if effective_batch % d == 0]
    if not divisors:
        raise CifarNetError(
            f"A micro-batch of 2 images would need about {(fixed + 2 * per_image) / 2**30:.1f} GiB, more than the "
            f"{budget / 2**30:.1f} GiB this GPU has free; free memory or use a smaller --image-size."
        )
    batch = divisors[0]
    return MemoryFit(batch, effective_batch // batch, per_image, fixed, budget, measured=True)
