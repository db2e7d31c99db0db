"""Micro-batches that fit: the largest micro-batch the device's memory holds, from a short measured probe.

Training memory is close to linear in the micro-batch: a fixed part (weights, gradients, momentum) and a part
per image (the activations saved for the backward pass). Probe steps at two batch sizes give both; the
micro-batch is then the largest divisor of the effective batch whose estimate stays within a safety share of
the free memory, and the accumulation makes up the rest, so the recipe (effective batch, learning rate,
schedule) does not change. The estimate also holds what comes on top of one eager step: a captured step's
graph keeps its own memory pool, beside which an epoch's short last micro-batch runs eagerly; evaluation runs
at twice the micro-batch; and the data set lives on the device (on an integrated GPU, such as a Jetson's, in
the same memory whether it is on the device or pinned on the host).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cifarnet_cli.data.loader import fits_on_device
from cifarnet_cli.devices import Precision, autocast, free_memory_bytes, is_integrated
from cifarnet_cli.errors import CifarNetError
from cifarnet_cli.models import Classifier

#: Share of the free memory a run plans to use. The rest absorbs the caching allocator's fragmentation,
#: cuDNN workspaces chosen by autotuning, and (on a Jetson) the CPU side of the same memory.
SAFETY = 0.8
#: The largest probe. Probes of 8 and 16 images of ResNet-20 at 32 px differ by 10-15 MB, which the
#: workspaces of cuDNN's algorithms can swamp; 32 and 128 differ by about ten times that.
PROBE_LARGE = 128
COARSE_LARGE = 8  # the first, small probe pair is (2, 8): it says which larger pair fits


@dataclass(frozen=True)
class MemoryFit:
    batch_size: int
    accum: int
    bytes_per_image: int
    fixed_bytes: int
    budget_bytes: int  # memory the run may use in all
    measured: bool  # False off CUDA: nothing was probed, the recipe's micro-batch is kept
    captured: bool = False  # budgeted for a captured step: its graph's pool and an eager last micro-batch
    eval_bytes_per_image: int = 0  # evaluation, in inference mode, at twice the micro-batch
    data_bytes: int = 0  # the data set's share of the device's memory

    def describe(self) -> str:
        if not self.measured:
            return f"micro-batch {self.batch_size} × accum {self.accum} (the recipe's; not probed off CUDA)"
        training = f"about {self.bytes_per_image / 2**20:.1f} MiB per image"
        if self.captured:
            training += " twice (the captured step's graph, and an eager last micro-batch)"
        extra = (
            f", {self.eval_bytes_per_image / 2**20:.1f} MiB per image evaluating" if self.eval_bytes_per_image else ""
        )
        data = f", {self.data_bytes / 2**30:.2f} GiB of data" if self.data_bytes else ""
        return (
            f"micro-batch {self.batch_size} × accum {self.accum}: {training}{extra}{data} and "
            f"{self.fixed_bytes / 2**30:.2f} GiB fixed, within {self.budget_bytes / 2**30:.1f} GiB "
            f"({SAFETY:.0%} of what is free)"
        )


@dataclass(frozen=True)
class MemoryLine:
    """Peak memory of a training step ≈ ``fixed + batch × per_image``, measured at ``small`` and ``large``."""

    per_image: int
    fixed: int
    small: int
    large: int


def _peak_bytes(model: Classifier, device: torch.device, precision: Precision, batch: int) -> int:
    """Peak memory allocated by one training step (forward, backward, SGD update) at ``batch``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    try:
        with autocast(device, precision, cache=False):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    finally:
        optimizer.zero_grad(set_to_none=True)  # also after running out of memory: the next probe starts clean
        del x, y, optimizer


def _eval_peak_bytes(model: Classifier, device: torch.device, precision: Precision, batch: int) -> int:
    """Memory an evaluation batch of ``batch`` images adds (inference mode), beyond what is allocated."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = int(torch.cuda.memory_allocated(device))
    model.eval()
    try:
        x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(device, precision):
            model(x)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)) - base
    finally:
        model.train()


def _budget_bytes(device: torch.device) -> int:
    """Memory the run may use in all: what is allocated now plus :data:`SAFETY` of what is free."""
    torch.cuda.empty_cache()
    allocated = int(torch.cuda.memory_allocated(device))
    reserved = int(torch.cuda.memory_reserved(device))
    free = free_memory_bytes(device) or 0
    if not is_integrated(device):
        free += reserved - allocated  # cached by this process: free for its own use
    return allocated + int(SAFETY * free)


def data_bytes_on_device(sizes: Sequence[int], device: torch.device) -> int:
    """The share of the device's memory that data sets of ``sizes`` bytes (uint8 images) take: all of it on an
    integrated GPU (a copy on the device and a pinned copy on the host are the same memory), else the sets the
    loader places on the device."""
    if device.type != "cuda" or not sizes:
        return 0
    if is_integrated(device):
        return sum(sizes)
    return sum(n for n in sizes if fits_on_device(n, device))


def _halvings(n: int) -> Iterator[int]:
    while n > 2:
        yield n
        n //= 2


def _line(peak: Callable[[int], int], small: int, large: int) -> MemoryLine:
    p_small, p_large = peak(small), peak(large)
    per_image = max(1, (p_large - p_small) // (large - small))
    return MemoryLine(per_image, max(0, p_small - per_image * small), small, large)


def measure_line(peak: Callable[[int], int], cap: int, budget: int) -> MemoryLine:
    """The memory line of a training step from ``peak(batch)`` probes: first 2 and (at most) 8 images, then the
    largest pair ``(n / 4, n)`` with ``n`` at most :data:`PROBE_LARGE` and ``cap`` that this first estimate says
    fits ``budget`` (so that a probe does not run a small board out of memory); a probe that runs out of memory
    anyway halves ``n``. Raises torch.cuda.OutOfMemoryError when not even 2 and 3 images fit."""
    coarse: MemoryLine | None = None
    for large in _halvings(min(COARSE_LARGE, cap)):
        try:
            coarse = _line(peak, 2, large)
            break
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    if coarse is None:
        raise torch.cuda.OutOfMemoryError("not even a training step of 2 and 3 images fits")
    for large in _halvings(min(PROBE_LARGE, cap)):
        if large <= coarse.large:
            break
        if coarse.fixed + large * coarse.per_image > budget:
            continue
        try:
            return _line(peak, max(2, large // 4), large)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return coarse


def measure_eval(peak: Callable[[int], int], batch: int, fallback: int) -> int:
    """Bytes per image of evaluation from ``peak(batch)`` (halving ``batch`` when it runs out of memory);
    ``fallback`` when not even 2 images could be measured."""
    for size in _halvings(max(3, batch)):
        try:
            return max(1, peak(size) // size)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
    return fallback


def _measure(
    probe: Classifier, device: torch.device, precision: Precision, cap: int, budget: int
) -> tuple[MemoryLine, int]:
    """The training step's memory line and evaluation's bytes per image, measured on ``probe``."""
    line = measure_line(lambda b: _peak_bytes(probe, device, precision, b), cap, budget)
    per_eval = measure_eval(lambda b: _eval_peak_bytes(probe, device, precision, b), 2 * line.large, line.per_image)
    return line, per_eval


def fit_micro_batch(
    model: Classifier,
    *,
    device: torch.device,
    precision: Precision,
    effective_batch: int,
    cap: int,
    captured: bool = False,
    data_bytes: int = 0,
) -> MemoryFit:
    """The largest divisor of ``effective_batch``, at most ``cap``, whose training fits in memory: a training step
    (twice when ``captured``), an evaluation batch of twice as many images, and ``data_bytes`` of data.

    The probe trains a copy of ``model`` (the model itself is left as it was) with cuDNN autotuning off,
    so that the figures do not include the workspaces of algorithms being tried.
    """
    cap = max(1, min(cap, effective_batch))
    if device.type != "cuda" or cap <= 2:
        return MemoryFit(cap, max(1, effective_batch // cap), 0, 0, 0, measured=False)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        budget = _budget_bytes(device)
        line, per_eval = _measure(copy.deepcopy(model).train(), device, precision, cap, budget)
    except torch.cuda.OutOfMemoryError:
        raise CifarNetError(
            "Not even a micro-batch of 2 images fits in the GPU's memory; free memory (other processes) "
            "or use a smaller --image-size."
        ) from None
    finally:
        torch.backends.cudnn.benchmark = benchmark
        torch.cuda.empty_cache()  # the probe copy is gone: its memory goes back
    return choose_micro_batch(
        effective_batch,
        cap,
        per_image=line.per_image,
        fixed=line.fixed,
        budget=budget,
        captured=captured,
        eval_per_image=per_eval,
        data_bytes=data_bytes,
    )


def choose_micro_batch(
    effective_batch: int,
    cap: int,
    *,
    per_image: int,
    fixed: int,
    budget: int,
    captured: bool = False,
    eval_per_image: int = 0,
    data_bytes: int = 0,
) -> MemoryFit:
    """The largest divisor of ``effective_batch`` (at most ``cap``, at least 2) with
    ``fixed + data_bytes + batch × per_image × (2 if captured else 1) + 2 × batch × eval_per_image <= budget``."""
    each = per_image * (2 if captured else 1) + 2 * eval_per_image
    limit = (budget - fixed - data_bytes) // max(1, each)
    divisors = [d for d in range(min(cap, effective_batch, limit), 1, -1) if effective_batch % d == 0]
    if not divisors:
        raise CifarNetError(
            f"A micro-batch of 2 images would need about {(fixed + data_bytes + 2 * each) / 2**30:.1f} GiB, more "
            f"than the {budget / 2**30:.1f} GiB this GPU has free; free memory or use a smaller --image-size."
        )
    batch = divisors[0]
    return MemoryFit(
        batch, effective_batch // batch, per_image, fixed, budget, True, captured, eval_per_image, data_bytes
    )
